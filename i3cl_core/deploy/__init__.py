"""Deployment: export a trained detector to ONNX (:mod:`.onnx_export`, needs torch) and run it without
torch (:mod:`.onnx_runtime`: onnxruntime, numpy and OpenCV only). docs/deploy.md."""
