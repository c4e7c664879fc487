"""The simulated users of the demo: Acme Shop's customer-service scenario (`scenario`), how its
customers judge answers (`rubric`), and their traffic through the public API (`users`)."""
