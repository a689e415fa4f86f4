"""The plain-PyTorch spec of every op: readable, float64-capable, runs on any device."""
