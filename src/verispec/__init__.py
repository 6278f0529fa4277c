"""verispec: lossless speculative decoding.

import verispec
target = verispec.load_model("qwen2.5-coder-1.5b")
drafter = verispec.DraftModelDrafter(verispec.load_model("qwen2.5-coder-0.5b"), target=target)
result = verispec.generate(target, drafter, "Write a quicksort in Python.")
print(result.text, result.stats.acceptance_rate)
"""

from verispec.drafting import (
    Draft,
    Drafter,
    DraftModelDrafter,
    DraftRequest,
    HybridDrafter,
    PromptLookupDrafter,
    Proposer,
    StatelessDrafter,
)
from verispec.engine import SequenceState, StepEvent, speculate, step
from verispec.errors import (
    DrafterError,
    IncompatibleTokenizersError,
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    PromptTooLongError,
    UnknownPresetError,
    VerispecError,
)
from verispec.generate import (
    Generation,
    GenerationResult,
    TextEvent,
    encode_prompt,
    generate,
    stream,
)
from verispec.models import HFModel, LanguageModel, load_model
from verispec.policy.costs import CostModel, costs_for
from verispec.prefix import PrefixCache
from verispec.sampling import SamplingParams
from verispec.stats import GenerationStats

__version__ = "0.1.0"

__all__ = [
    "CostModel",
    "Draft",
    "DraftModelDrafter",
    "DraftRequest",
    "Drafter",
    "DrafterError",
    "Generation",
    "GenerationResult",
    "GenerationStats",
    "HFModel",
    "HybridDrafter",
    "IncompatibleTokenizersError",
    "InvalidArgumentError",
    "LanguageModel",
    "ModelFormatError",
    "ModelNotFoundError",
    "PrefixCache",
    "PromptLookupDrafter",
    "PromptTooLongError",
    "Proposer",
    "SamplingParams",
    "SequenceState",
    "StatelessDrafter",
    "StepEvent",
    "TextEvent",
    "UnknownPresetError",
    "VerispecError",
    "costs_for",
    "encode_prompt",
    "generate",
    "load_model",
    "speculate",
    "step",
    "stream",
]
