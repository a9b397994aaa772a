"""One registry per family of components (encodings, datasets, models).

A registry maps a name used in the config (`otype: HashGrid`, `name: dtu`) to a class.
Registering a name twice is an error, and a failed lookup lists the valid names, so a
typo in a config file is reported at load time with what would have worked.
"""
from typing import Callable, Dict, List, Type


class Registry:
    def __init__(self, family: str):
        self.family = family
        self._classes: Dict[str, Type] = {}

    def register(self, name: str) -> Callable[[Type], Type]:
        def decorator(cls: Type) -> Type:
            if name in self._classes:
                raise KeyError(
                    f"{self.family} '{name}' is registered twice "
                    f"({self._classes[name].__module__} and {cls.__module__})"
                )
            self._classes[name] = cls
            return cls

        return decorator

    def get(self, name: str) -> Type:
        if name not in self._classes:
            raise KeyError(
                f"unknown {self.family} '{name}'; valid names: {', '.join(self.names())}"
            )
        return self._classes[name]

    def names(self) -> List[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes
