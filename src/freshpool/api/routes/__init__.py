"""The API's routes, one module per resource: requests, nodes, the pool, the
dashboard's status, metrics."""
