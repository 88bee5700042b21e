"""Writes the bundled "house style" dataset: train.jsonl, valid.jsonl and heldout.jsonl (prompts for scoring).

The house style (see trainer.house_style): answer with exactly one ```python block and no prose; every function has
full type hints and a one-line docstring. Written for this project (MIT, like the code). Re-run to regenerate:
    uv run python tools/make_house_style_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# name, signature, docstring, body, task phrasing
SPECS: list[tuple[str, str, str, str, str]] = [
    (
        "is_even",
        "n: int) -> bool",
        "Return True when n is even.",
        "return n % 2 == 0",
        "checks whether an integer is even",
    ),
    (
        "is_odd",
        "n: int) -> bool",
        "Return True when n is odd.",
        "return n % 2 == 1",
        "checks whether an integer is odd",
    ),
    ("square", "x: float) -> float", "Return x squared.", "return x * x", "squares a number"),
    ("cube", "x: float) -> float", "Return x cubed.", "return x * x * x", "cubes a number"),
    ("add", "a: int, b: int) -> int", "Return the sum of a and b.", "return a + b", "adds two integers"),
    ("subtract", "a: int, b: int) -> int", "Return a minus b.", "return a - b", "subtracts b from a"),
    ("multiply", "a: int, b: int) -> int", "Return the product of a and b.", "return a * b", "multiplies two integers"),
    (
        "average",
        "values: list[float]) -> float",
        "Return the mean of values.",
        "return sum(values) / len(values)",
        "computes the average of a list of numbers",
    ),
    (
        "maximum",
        "values: list[int]) -> int",
        "Return the largest value.",
        "return max(values)",
        "finds the largest number in a list",
    ),
    (
        "minimum",
        "values: list[int]) -> int",
        "Return the smallest value.",
        "return min(values)",
        "finds the smallest number in a list",
    ),
    ("reverse_string", "text: str) -> str", "Return text reversed.", "return text[::-1]", "reverses a string"),
    (
        "count_vowels",
        "text: str) -> int",
        "Return how many vowels text contains.",
        'return sum(1 for ch in text.lower() if ch in "aeiou")',
        "counts the vowels in a string",
    ),
    (
        "is_palindrome",
        "text: str) -> bool",
        "Return True when text reads the same backwards.",
        "return text == text[::-1]",
        "checks whether a string is a palindrome",
    ),
    (
        "factorial",
        "n: int) -> int",
        "Return n factorial.",
        "result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result",
        "computes the factorial of n",
    ),
    (
        "fibonacci",
        "n: int) -> int",
        "Return the n-th Fibonacci number.",
        "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        "returns the n-th Fibonacci number",
    ),
    (
        "celsius_to_fahrenheit",
        "celsius: float) -> float",
        "Return the temperature in Fahrenheit.",
        "return celsius * 9 / 5 + 32",
        "converts Celsius to Fahrenheit",
    ),
    (
        "fahrenheit_to_celsius",
        "fahrenheit: float) -> float",
        "Return the temperature in Celsius.",
        "return (fahrenheit - 32) * 5 / 9",
        "converts Fahrenheit to Celsius",
    ),
    (
        "word_count",
        "text: str) -> int",
        "Return the number of words in text.",
        "return len(text.split())",
        "counts the words in a sentence",
    ),
    (
        "capitalize_words",
        "text: str) -> str",
        "Return text with every word capitalized.",
        'return " ".join(word.capitalize() for word in text.split())',
        "capitalizes every word of a sentence",
    ),
    (
        "remove_duplicates",
        "items: list[int]) -> list[int]",
        "Return items without duplicates, in order.",
        "return list(dict.fromkeys(items))",
        "removes duplicates from a list while keeping order",
    ),
    (
        "flatten",
        "nested: list[list[int]]) -> list[int]",
        "Return the nested lists joined into one list.",
        "return [x for inner in nested for x in inner]",
        "flattens a list of lists",
    ),
    (
        "sum_of_squares",
        "values: list[int]) -> int",
        "Return the sum of the squares of values.",
        "return sum(v * v for v in values)",
        "sums the squares of a list of numbers",
    ),
    (
        "is_prime",
        "n: int) -> bool",
        "Return True when n is a prime number.",
        "if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n**0.5) + 1))",
        "checks whether a number is prime",
    ),
    (
        "gcd",
        "a: int, b: int) -> int",
        "Return the greatest common divisor of a and b.",
        "while b:\n        a, b = b, a % b\n    return a",
        "computes the greatest common divisor of two numbers",
    ),
    (
        "lcm",
        "a: int, b: int) -> int",
        "Return the least common multiple of a and b.",
        "from math import gcd\n\n    return a * b // gcd(a, b)",
        "computes the least common multiple of two numbers",
    ),
    (
        "clamp",
        "value: float, low: float, high: float) -> float",
        "Return value limited to the range low..high.",
        "return max(low, min(high, value))",
        "clamps a value between a lower and an upper bound",
    ),
    (
        "absolute",
        "x: float) -> float",
        "Return the absolute value of x.",
        "return x if x >= 0 else -x",
        "returns the absolute value of a number",
    ),
    (
        "count_char",
        "text: str, char: str) -> int",
        "Return how often char occurs in text.",
        "return text.count(char)",
        "counts how often a character occurs in a string",
    ),
    (
        "starts_with_vowel",
        "word: str) -> bool",
        "Return True when word starts with a vowel.",
        'return word[:1].lower() in ("a", "e", "i", "o", "u")',
        "checks whether a word starts with a vowel",
    ),
    (
        "to_upper",
        "text: str) -> str",
        "Return text in upper case.",
        "return text.upper()",
        "converts a string to upper case",
    ),
    (
        "to_lower",
        "text: str) -> str",
        "Return text in lower case.",
        "return text.lower()",
        "converts a string to lower case",
    ),
    (
        "last_element",
        "items: list[int]) -> int",
        "Return the last item of items.",
        "return items[-1]",
        "returns the last element of a list",
    ),
    (
        "first_element",
        "items: list[int]) -> int",
        "Return the first item of items.",
        "return items[0]",
        "returns the first element of a list",
    ),
    (
        "list_length",
        "items: list[int]) -> int",
        "Return the number of items.",
        "return len(items)",
        "returns the length of a list",
    ),
    (
        "sort_numbers",
        "values: list[int]) -> list[int]",
        "Return values sorted in ascending order.",
        "return sorted(values)",
        "sorts a list of numbers",
    ),
    (
        "sort_descending",
        "values: list[int]) -> list[int]",
        "Return values sorted from largest to smallest.",
        "return sorted(values, reverse=True)",
        "sorts a list of numbers in descending order",
    ),
    (
        "even_numbers",
        "values: list[int]) -> list[int]",
        "Return only the even values.",
        "return [v for v in values if v % 2 == 0]",
        "keeps only the even numbers of a list",
    ),
    (
        "odd_numbers",
        "values: list[int]) -> list[int]",
        "Return only the odd values.",
        "return [v for v in values if v % 2 == 1]",
        "keeps only the odd numbers of a list",
    ),
    (
        "double_all",
        "values: list[int]) -> list[int]",
        "Return every value doubled.",
        "return [2 * v for v in values]",
        "doubles every number in a list",
    ),
    (
        "join_words",
        "words: list[str]) -> str",
        "Return the words joined with spaces.",
        'return " ".join(words)',
        "joins a list of words into a sentence",
    ),
    (
        "split_lines",
        "text: str) -> list[str]",
        "Return the lines of text.",
        "return text.splitlines()",
        "splits a text into lines",
    ),
    (
        "char_frequency",
        "text: str) -> dict[str, int]",
        "Return how often each character occurs in text.",
        "counts: dict[str, int] = {}\n    for ch in text:\n        counts[ch] = counts.get(ch, 0) + 1\n    return counts",
        "counts how often each character occurs in a string",
    ),
    (
        "merge_dicts",
        "a: dict[str, int], b: dict[str, int]) -> dict[str, int]",
        "Return a merged with b.",
        "return {**a, **b}",
        "merges two dictionaries",
    ),
    (
        "invert_dict",
        "mapping: dict[str, int]) -> dict[int, str]",
        "Return mapping with keys and values swapped.",
        "return {v: k for k, v in mapping.items()}",
        "swaps the keys and values of a dictionary",
    ),
    (
        "rectangle_area",
        "width: float, height: float) -> float",
        "Return the area of the rectangle.",
        "return width * height",
        "computes the area of a rectangle",
    ),
    (
        "circle_area",
        "radius: float) -> float",
        "Return the area of a circle of this radius.",
        "from math import pi\n\n    return pi * radius**2",
        "computes the area of a circle",
    ),
    (
        "triangle_area",
        "base: float, height: float) -> float",
        "Return the area of the triangle.",
        "return base * height / 2",
        "computes the area of a triangle",
    ),
    (
        "is_leap_year",
        "year: int) -> bool",
        "Return True when year is a leap year.",
        "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
        "checks whether a year is a leap year",
    ),
    (
        "digit_sum",
        "n: int) -> int",
        "Return the sum of the digits of n.",
        "return sum(int(d) for d in str(abs(n)))",
        "adds up the digits of a number",
    ),
    (
        "count_digits",
        "n: int) -> int",
        "Return how many digits n has.",
        "return len(str(abs(n)))",
        "counts the digits of a number",
    ),
    (
        "power",
        "base: float, exponent: int) -> float",
        "Return base raised to exponent.",
        "return base**exponent",
        "raises a number to a power",
    ),
    (
        "safe_divide",
        "a: float, b: float) -> float",
        "Return a divided by b, or 0.0 when b is zero.",
        "return a / b if b else 0.0",
        "divides two numbers and returns 0 when dividing by zero",
    ),
    (
        "percentage",
        "part: float, whole: float) -> float",
        "Return part as a percentage of whole.",
        "return 100 * part / whole",
        "computes what percentage one number is of another",
    ),
    (
        "repeat_string",
        "text: str, times: int) -> str",
        "Return text repeated the given number of times.",
        "return text * times",
        "repeats a string a number of times",
    ),
    (
        "strip_spaces",
        "text: str) -> str",
        "Return text without leading and trailing spaces.",
        "return text.strip()",
        "removes the spaces around a string",
    ),
    (
        "contains_digit",
        "text: str) -> bool",
        "Return True when text contains a digit.",
        "return any(ch.isdigit() for ch in text)",
        "checks whether a string contains a digit",
    ),
    (
        "longest_word",
        "text: str) -> str",
        "Return the longest word in text.",
        "return max(text.split(), key=len)",
        "finds the longest word in a sentence",
    ),
    (
        "shortest_word",
        "text: str) -> str",
        "Return the shortest word in text.",
        "return min(text.split(), key=len)",
        "finds the shortest word in a sentence",
    ),
    (
        "running_total",
        "values: list[int]) -> list[int]",
        "Return the running totals of values.",
        "totals: list[int] = []\n    total = 0\n    for v in values:\n        total += v\n        totals.append(total)\n"
        "    return totals",
        "computes the running total of a list",
    ),
    (
        "chunk_list",
        "items: list[int], size: int) -> list[list[int]]",
        "Return items split into chunks of size.",
        "return [items[i : i + size] for i in range(0, len(items), size)]",
        "splits a list into chunks of a given size",
    ),
    (
        "pairwise_sums",
        "a: list[int], b: list[int]) -> list[int]",
        "Return the element-wise sums of a and b.",
        "return [x + y for x, y in zip(a, b)]",
        "adds two lists element by element",
    ),
    (
        "count_positive",
        "values: list[int]) -> int",
        "Return how many values are positive.",
        "return sum(1 for v in values if v > 0)",
        "counts the positive numbers in a list",
    ),
    (
        "index_of",
        "items: list[str], target: str) -> int",
        "Return the index of target, or -1 when absent.",
        "return items.index(target) if target in items else -1",
        "finds the position of an item in a list",
    ),
    (
        "median",
        "values: list[float]) -> float",
        "Return the median of values.",
        "ordered = sorted(values)\n    mid = len(ordered) // 2\n    if len(ordered) % 2:\n        return ordered[mid]\n"
        "    return (ordered[mid - 1] + ordered[mid]) / 2",
        "computes the median of a list of numbers",
    ),
    (
        "is_sorted",
        "values: list[int]) -> bool",
        "Return True when values are in ascending order.",
        "return all(a <= b for a, b in zip(values, values[1:]))",
        "checks whether a list is sorted",
    ),
    (
        "swap_case",
        "text: str) -> str",
        "Return text with upper and lower case swapped.",
        "return text.swapcase()",
        "swaps the case of every letter in a string",
    ),
    (
        "initials",
        "name: str) -> str",
        "Return the initials of a full name.",
        'return "".join(part[0].upper() for part in name.split())',
        "returns the initials of a name",
    ),
    (
        "miles_to_km",
        "miles: float) -> float",
        "Return the distance in kilometres.",
        "return miles * 1.609344",
        "converts miles to kilometres",
    ),
    (
        "km_to_miles",
        "km: float) -> float",
        "Return the distance in miles.",
        "return km / 1.609344",
        "converts kilometres to miles",
    ),
    (
        "seconds_to_minutes",
        "seconds: float) -> float",
        "Return the duration in minutes.",
        "return seconds / 60",
        "converts seconds to minutes",
    ),
    (
        "hours_to_seconds",
        "hours: float) -> float",
        "Return the duration in seconds.",
        "return hours * 3600",
        "converts hours to seconds",
    ),
    (
        "is_empty",
        "text: str) -> bool",
        "Return True when text is empty or only spaces.",
        "return not text.strip()",
        "checks whether a string is empty",
    ),
    (
        "nth_power_sum",
        "values: list[int], n: int) -> int",
        "Return the sum of each value raised to n.",
        "return sum(v**n for v in values)",
        "sums the n-th powers of a list of numbers",
    ),
    (
        "product",
        "values: list[int]) -> int",
        "Return the product of values.",
        "result = 1\n    for v in values:\n        result *= v\n    return result",
        "multiplies all numbers of a list",
    ),
    (
        "range_list",
        "start: int, stop: int) -> list[int]",
        "Return the integers from start up to stop.",
        "return list(range(start, stop))",
        "returns the integers between two bounds",
    ),
]
HELDOUT = 12  # the last functions never appear in train or valid: they score the behaviour on new tasks

PHRASINGS = [
    "Write a Python function {name} that {task}.",
    "Write a function called {name} that {task}.",
    "Create a Python function named {name} which {task}.",
    "Implement {name} in Python: it {task}.",
    "I need a Python function {name} that {task}.",
    "Please write {name}(), a function that {task}.",
]


def answer(name: str, signature: str, doc: str, body: str) -> str:
    return f'```python\ndef {name}({signature}:\n    """{doc}"""\n    {body}\n```'


def example(spec: tuple[str, str, str, str, str], phrasing: str) -> dict[str, object]:
    name, signature, doc, body, task = spec
    return {
        "messages": [
            {"role": "user", "content": phrasing.format(name=name, task=task)},
            {"role": "assistant", "content": answer(name, signature, doc, body)},
        ]
    }


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "src" / "mcp_local_demo" / "datasets" / "house_style"
    rng = random.Random(0)
    seen, heldout = SPECS[:-HELDOUT], SPECS[-HELDOUT:]
    train, valid = [], []
    for spec in seen:
        phrasings = PHRASINGS[:]
        rng.shuffle(phrasings)
        train += [example(spec, p) for p in phrasings[:5]]
        valid.append(example(spec, phrasings[5]))
    rng.shuffle(train)
    for split, rows in (("train", train), ("valid", valid)):
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    prompts = [{"prompt": PHRASINGS[0].format(name=s[0], task=s[4]), "function": s[0]} for s in heldout]
    (folder / "heldout.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
