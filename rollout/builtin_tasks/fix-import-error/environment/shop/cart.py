from shop.pricing import unit_price


class Cart:
    def __init__(self):
        self.lines = []

    def add(self, item, quantity=1):
        self.lines.append((item, quantity))

    def total(self):
        return round(sum(unit_price(item) * quantity for item, quantity in self.lines), 2)
