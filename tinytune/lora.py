"""`tt.lora`: LoRA on any nn.Module (the implementation lives in `tinytune.peft.lora`)."""
from .peft.lora import *  # noqa: F401,F403
from .peft.lora import __all__  # noqa: F401
