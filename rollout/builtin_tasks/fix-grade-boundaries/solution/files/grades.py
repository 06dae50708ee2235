def letter_grade(score):
    """A for 90 and above, B for 80-89, C for 70-79, D for 60-69, F below 60."""
    if score >= 90:
        return "A"
    if score >= 80:
        return "B"
    if score >= 70:
        return "C"
    if score >= 60:
        return "D"
    return "F"
