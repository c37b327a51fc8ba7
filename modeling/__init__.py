"""The torch model layer: model families and loaders, the proxy spec and its compression, and the
LoRA/PEFT adapter keys. Below `export` and `cloud`, above `shared`; it never imports either."""
