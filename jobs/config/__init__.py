"""Settings: YAML files in conf/ loaded once into typed, frozen dataclasses, one module per section."""
