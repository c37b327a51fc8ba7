"""Simulation: the layer above both sides. It hosts the devices' own code (edge agents, secure-
aggregation participants) in the cloud's process, so it may import `cloud` and `edge`; neither
of them imports it. `fedpft-cloud simulate --engine virtual` finds its engine through the
`fedpft.engines` entry-point group (pyproject.toml)."""
