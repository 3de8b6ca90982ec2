"""Route modules: thin handlers that validate, call one service method and return a schema."""
