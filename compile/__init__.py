"""The offline pipeline: data → SASRec → ONNX → PALR data → LoRA fine-tune → merge → builds.

Run `python -m compile --help` for the steps; each step's options come from its config dataclass.
"""
