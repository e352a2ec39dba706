"""Native TensorRT: building engines from the bundle graph and running them."""
