"""OpenAI's wire: paths, the request models, uploads, SSE, the error envelope, headers."""
