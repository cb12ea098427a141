"""The client runtime: a fixed-rate control loop executing action chunks."""
