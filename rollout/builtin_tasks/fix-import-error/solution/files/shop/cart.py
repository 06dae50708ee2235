from shop.pricing import price_of


class Cart:
    def __init__(self):
        self.lines = []

    def add(self, item, quantity=1):
        self.lines.append((item, quantity))

    def total(self):
        return round(sum(price_of(item) * quantity for item, quantity in self.lines), 2)
