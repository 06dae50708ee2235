from dataclasses import dataclass


@dataclass
class Line:
    sku: str
    unit_price: float
    quantity: int

    @property
    def subtotal(self):
        return self.unit_price * self.quantity
