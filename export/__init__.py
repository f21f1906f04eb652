"""Export: VGG19's target module to ONNX, verified against PyTorch, kept in a model store."""

from .onnx_export import TOLERANCE, VERIFY_SIZES, ExportError, ExportResult, ModuleSpec, TargetModule, export_targets, export_to_store, target_module, verify

__all__ = ["TOLERANCE", "VERIFY_SIZES", "ExportError", "ExportResult", "ModuleSpec", "TargetModule", "export_targets", "export_to_store", "target_module", "verify"]
