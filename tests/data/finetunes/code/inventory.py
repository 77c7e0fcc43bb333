"""A small inventory of items kept in a dictionary, with counts and prices."""

from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    count: int = 0


@dataclass
class Inventory:
    items: dict = field(default_factory=dict)

    def add(self, name, price, count=1):
        if name in self.items:
            self.items[name].count += count
        else:
            self.items[name] = Item(name, price, count)

    def remove(self, name, count=1):
        item = self.items.get(name)
        if item is None:
            raise KeyError(f"no item named {name!r}")
        if item.count < count:
            raise ValueError(f"only {item.count} of {name!r} left")
        item.count -= count
        if item.count == 0:
            del self.items[name]

    def total(self):
        return sum(item.price * item.count for item in self.items.values())

    def names(self):
        return sorted(self.items)
