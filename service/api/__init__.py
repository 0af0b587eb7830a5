"""HTTP routers, one per resource; thin: resolve, call serving, shape the response."""
