"""The configuration model (typed, frozen), its strict YAML loader and its validation rules."""
