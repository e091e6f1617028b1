"""What the proxy tells: the access log, metrics, the console's activity."""
