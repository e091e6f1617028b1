"""The bundled proxy: its front door, the app it assembles, the command line."""
