"""Transport: the shared-memory segment that carries a request's tensors, and the small
descriptors that stand in for them inside the pickled request."""
