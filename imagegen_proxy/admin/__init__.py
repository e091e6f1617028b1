"""The admin plane: OpenAI's Admin API, usage and costs, the shell commands."""
