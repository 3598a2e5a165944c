"""A registry of named, weighted functions: stage 1's loss terms (medlvr/train/sft/terms.py) and
VLPO's rewards (medlvr/train/vlpo/rewards.py) are each one. A new term or reward is a function
and one ``register`` call; the code that uses them iterates the registry in registration order
and reports each entry under its name, so it never names them itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Entry", "Registry"]


@dataclass(frozen=True)
class Entry:
    """A registered function and its weight: a number, or a function of the stage's config."""
    name: str
    fn: Callable[..., Any]
    weight: float | Callable[[Any], float] = 1.0

    def weight_for(self, cfg: Any) -> float:
        return float(self.weight(cfg) if callable(self.weight) else self.weight)


class Registry(dict):
    """name -> :class:`Entry`. what: the kind of entry, for the errors ("loss term");
    reserved: names the entries may not take (the user's metric names that are already used);
    signature: what ``fn`` must be, for the errors; negative_weights: whether a fixed weight may
    be below 0."""

    def __init__(self, what: str, *, reserved: tuple[str, ...], signature: str, negative_weights: bool):
        super().__init__()
        self.what, self.reserved, self.signature, self.negative_weights = what, reserved, signature, negative_weights

    def register(self, name: str, fn: Callable[..., Any], *, weight: float | Callable[[Any], float] = 1.0) -> Entry:
        if not isinstance(name, str) or not name.isidentifier() or name in self.reserved:
            raise ValueError(f"name: expected an identifier other than {self.reserved}, got {name!r}")
        if name in self:
            raise ValueError(f"name: a {self.what} {name!r} is already registered (unregister it first)")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable {self.signature}, got {type(fn).__name__}")
        fixed = not callable(weight)
        if fixed and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                      or (weight < 0 and not self.negative_weights)):
            want = "a number" if self.negative_weights else "a number >= 0"
            raise ValueError(f"weight: expected {want} or a function of the config, got {weight!r}")
        self[name] = entry = Entry(name, fn, weight)
        return entry

    def unregister(self, name: str) -> None:
        if name not in self:
            raise ValueError(f"name: no {self.what} {name!r} is registered; registered: {sorted(self)}")
        del self[name]

    def weights(self, cfg: Any) -> dict[str, float]:
        """name -> weight of every entry under the config ``cfg``."""
        return {name: e.weight_for(cfg) for name, e in self.items()}
