"""jacobian_client: the Python SDK of jacobian-service (httpx + numpy, never torch)."""
