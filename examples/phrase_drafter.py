"""A drafter of your own: where the text is in the middle of a known phrase, propose its rest.

Run it:  python examples/phrase_drafter.py   (after `make run` has fetched the bundled models)
"""

from __future__ import annotations

from collections.abc import Sequence

import verispec


class PhraseDrafter(verispec.StatelessDrafter):
    """Proposes the rest of one of ``phrases`` (token ids) when the context ends with its start."""

    name = "phrases"

    def __init__(self, phrases: Sequence[Sequence[int]]) -> None:
        self.phrases = [list(p) for p in phrases if len(p) > 1]

    def propose(self, request: verispec.DraftRequest) -> verispec.Draft:
        tail = list(request.context[-max((len(p) for p in self.phrases), default=1) :])
        for phrase in self.phrases:
            for n in range(min(len(phrase) - 1, len(tail)), 0, -1):  # longest overlap first
                if tail[len(tail) - n :] == phrase[:n]:
                    return verispec.Draft(tokens=phrase[n : n + request.k])
        return verispec.Draft(tokens=[])


if __name__ == "__main__":
    target = verispec.load_model("qwen2.5-coder-1.5b")
    phrases = ["def is_palindrome(s: str) -> bool:", "return s == s[::-1]"]
    drafter = PhraseDrafter([target.tokenizer.encode(p) for p in phrases])
    result = verispec.generate(target, drafter, "Write a Python palindrome check.")
    print(result.text)
    print(f"{result.stats.accepted} of {result.stats.drafted} drafted tokens accepted")
