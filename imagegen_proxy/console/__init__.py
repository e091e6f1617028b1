"""The console: web pages for operators (the `console` extra: Jinja2, itsdangerous)."""
