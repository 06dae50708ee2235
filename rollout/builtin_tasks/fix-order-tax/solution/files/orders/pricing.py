TAX_RATE = 0.2


def order_total(lines, discount_code=None):
    """Subtotal of the lines, less the discount, plus tax on the discounted amount, rounded to cents.
    The code SAVE10 takes 10% off; other codes or none take nothing off."""
    subtotal = sum(line.subtotal for line in lines)
    discount = subtotal * 0.1 if discount_code == "SAVE10" else 0.0
    tax = (subtotal - discount) * TAX_RATE
    return round(subtotal - discount + tax, 2)
