"""The web process: serves every configured quantized variant side by side over HTTP."""
