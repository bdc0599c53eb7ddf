"""Early-exit inference on device windows (the `ml` extra: onnxruntime + numpy).

Nothing here imports onnxruntime or numpy at import time except `model`, `pipeline` and
`worker`, so a mapper without inference pipelines runs without them.

    settings   typed pipelines (mapper config `inference:` or a property's pushMethod.anomalyDetection)
    policy     softmax, confidence scores, the exit rule, audit sampling (pure functions)
    window     sliding windows of good readings per device, with a gap policy
    model      edge.onnx / cloud.onnx sessions, sha256 check, self-test
    codec      offload request / result messages (cut as int8 + scale, or float16)
    pipeline   one pipeline: window -> edge exit | offload -> decision -> actions
    extension  InferenceExtension: plugs pipelines into a running MapperService
    worker     `mapper cloud-worker`: runs cloud.onnx for offloaded cuts
"""
