"""sdrt runtime: prompt -> tokens -> CLIP -> (compose -> deproject) -> UNet loop -> VAE -> image.

numpy + onnxruntime (or TensorRT) only; this package never imports torch or diffusers.
"""
