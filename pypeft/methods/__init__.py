"""pypeft's methods, one package each; importing this registers them all.

A method outside this list registers the same way: subclass
pypeft.registry.Method and call pypeft.register_method(MyMethod()).
"""

from pypeft.methods import bitfit, bottleneck, fusion, lora, prefix, prompt, read, tokentune, vera  # noqa: F401  (each registers itself)
