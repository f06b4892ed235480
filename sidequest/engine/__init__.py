"""The engine: the one place where behaviour lives (`engine.Engine`; errors in `errors`)."""
