"""The pipeline stages. Each module exposes `run(config) -> Result`; none of them knows about click."""
