"""What people run: the CLI, the demo, the simulator, the benchmarks and the terminal clients."""
