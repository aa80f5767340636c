"""Peer servers for the image-classification benchmark (issue #19): TorchServe and PyTriton."""
