"""Writes the bundled grpo tasks (src/mcp_local_demo/datasets/python_tasks): small Python functions, each with a
prompt and asserts, written for this project (none is a HumanEval problem). Split by a fixed shuffle: 30 train, 6
valid, 12 test.

    uv run python tools/make_python_tasks.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "mcp_local_demo" / "datasets" / "python_tasks"
#: (function signature, what it does, asserts)
TASKS = [
    ("double(n)", "returns n times two", ["double(3) == 6", "double(0) == 0", "double(-4) == -8"]),
    ("square(n)", "returns n squared", ["square(3) == 9", "square(0) == 0", "square(-5) == 25"]),
    ("is_even(n)", "returns True when n is even", ["is_even(4) is True", "is_even(7) is False", "is_even(0) is True"]),
    (
        "last_item(items)",
        "returns the last element of a non-empty list",
        ["last_item([1, 2, 3]) == 3", "last_item(['a']) == 'a'", "last_item([0, None]) is None"],
    ),
    (
        "first_item(items)",
        "returns the first element of a non-empty list",
        ["first_item([5, 6]) == 5", "first_item(['x']) == 'x'", "first_item([[1], 2]) == [1]"],
    ),
    (
        "count_vowels(text)",
        "counts the vowels a, e, i, o, u (lower case) in text",
        ["count_vowels('hello') == 2", "count_vowels('xyz') == 0", "count_vowels('aeiou') == 5"],
    ),
    (
        "reverse_words(text)",
        "returns the words of text in reverse order, joined by single spaces",
        [
            "reverse_words('a b c') == 'c b a'",
            "reverse_words('one') == 'one'",
            "reverse_words('hi there') == 'there hi'",
        ],
    ),
    (
        "clamp(x, low, high)",
        "returns x limited to the range low..high",
        ["clamp(5, 0, 3) == 3", "clamp(-1, 0, 3) == 0", "clamp(2, 0, 3) == 2"],
    ),
    (
        "sum_of_digits(n)",
        "returns the sum of the decimal digits of a non-negative integer",
        ["sum_of_digits(123) == 6", "sum_of_digits(0) == 0", "sum_of_digits(909) == 18"],
    ),
    (
        "count_words(text)",
        "returns how many whitespace-separated words text has",
        ["count_words('a b  c') == 3", "count_words('') == 0", "count_words('word') == 1"],
    ),
    (
        "max_of_three(a, b, c)",
        "returns the largest of three numbers",
        ["max_of_three(1, 5, 3) == 5", "max_of_three(-1, -2, -3) == -1", "max_of_three(2, 2, 1) == 2"],
    ),
    (
        "is_palindrome(text)",
        "returns True when text reads the same backwards",
        ["is_palindrome('level') is True", "is_palindrome('abc') is False", "is_palindrome('') is True"],
    ),
    (
        "celsius_to_fahrenheit(c)",
        "converts degrees Celsius to Fahrenheit",
        ["celsius_to_fahrenheit(0) == 32", "celsius_to_fahrenheit(100) == 212", "celsius_to_fahrenheit(-40) == -40"],
    ),
    (
        "unique_sorted(items)",
        "returns the distinct items in ascending order, as a list",
        ["unique_sorted([3, 1, 3, 2]) == [1, 2, 3]", "unique_sorted([]) == []", "unique_sorted([5, 5]) == [5]"],
    ),
    (
        "factorial(n)",
        "returns n! for a non-negative integer n",
        ["factorial(0) == 1", "factorial(5) == 120", "factorial(1) == 1"],
    ),
    (
        "fibonacci(n)",
        "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
        ["fibonacci(0) == 0", "fibonacci(1) == 1", "fibonacci(10) == 55"],
    ),
    (
        "count_char(text, char)",
        "counts how often char occurs in text",
        ["count_char('banana', 'a') == 3", "count_char('abc', 'z') == 0", "count_char('', 'a') == 0"],
    ),
    (
        "capitalize_words(text)",
        "returns text with the first letter of every space-separated word in upper case",
        [
            "capitalize_words('hello world') == 'Hello World'",
            "capitalize_words('a') == 'A'",
            "capitalize_words('') == ''",
        ],
    ),
    (
        "average(numbers)",
        "returns the arithmetic mean of a non-empty list of numbers",
        ["average([1, 2, 3]) == 2", "average([5]) == 5", "average([1, 2]) == 1.5"],
    ),
    (
        "product(numbers)",
        "returns the product of a list of numbers (1 for an empty list)",
        ["product([2, 3, 4]) == 24", "product([]) == 1", "product([5, 0]) == 0"],
    ),
    (
        "only_positive(numbers)",
        "returns the numbers greater than zero, in order",
        ["only_positive([1, -2, 3]) == [1, 3]", "only_positive([]) == []", "only_positive([0, -1]) == []"],
    ),
    (
        "index_of_max(items)",
        "returns the index of the largest item (the first one on ties)",
        ["index_of_max([1, 9, 3]) == 1", "index_of_max([7]) == 0", "index_of_max([4, 4]) == 0"],
    ),
    (
        "repeat_string(text, n)",
        "returns text repeated n times",
        ["repeat_string('ab', 3) == 'ababab'", "repeat_string('x', 0) == ''", "repeat_string('', 5) == ''"],
    ),
    (
        "is_prime(n)",
        "returns True when n is a prime number",
        ["is_prime(2) is True", "is_prime(15) is False", "is_prime(1) is False", "is_prime(13) is True"],
    ),
    (
        "gcd(a, b)",
        "returns the greatest common divisor of two positive integers",
        ["gcd(12, 18) == 6", "gcd(7, 5) == 1", "gcd(10, 10) == 10"],
    ),
    (
        "flatten(lists)",
        "returns one list holding the items of a list of lists, in order",
        ["flatten([[1, 2], [3]]) == [1, 2, 3]", "flatten([]) == []", "flatten([[], [4]]) == [4]"],
    ),
    (
        "char_frequencies(text)",
        "returns a dict mapping each character of text to its count",
        [
            "char_frequencies('aab') == {'a': 2, 'b': 1}",
            "char_frequencies('') == {}",
            "char_frequencies('z') == {'z': 1}",
        ],
    ),
    (
        "remove_spaces(text)",
        "returns text without any space characters",
        ["remove_spaces('a b c') == 'abc'", "remove_spaces('') == ''", "remove_spaces('  x ') == 'x'"],
    ),
    (
        "second_largest(numbers)",
        "returns the second largest distinct number of a list with at least two distinct numbers",
        ["second_largest([1, 3, 2]) == 2", "second_largest([5, 5, 4]) == 4", "second_largest([-1, -2]) == -2"],
    ),
    (
        "is_sorted(items)",
        "returns True when items are in non-decreasing order",
        ["is_sorted([1, 2, 2, 3]) is True", "is_sorted([2, 1]) is False", "is_sorted([]) is True"],
    ),
    (
        "merge_dicts(a, b)",
        "returns a new dict with the keys of a and b, b's values winning on shared keys",
        [
            "merge_dicts({'x': 1}, {'y': 2}) == {'x': 1, 'y': 2}",
            "merge_dicts({'x': 1}, {'x': 3}) == {'x': 3}",
            "merge_dicts({}, {}) == {}",
        ],
    ),
    (
        "chunk(items, size)",
        "splits a list into consecutive lists of at most size items",
        ["chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]", "chunk([], 3) == []", "chunk([1], 1) == [[1]]"],
    ),
    (
        "title_case_count(text)",
        "counts the words of text that start with an upper-case letter",
        ["title_case_count('Hello there World') == 2", "title_case_count('') == 0", "title_case_count('a B c') == 1"],
    ),
    (
        "digits_to_int(digits)",
        "turns a list of decimal digits into the integer they spell",
        ["digits_to_int([1, 2, 3]) == 123", "digits_to_int([0]) == 0", "digits_to_int([4, 0]) == 40"],
    ),
    (
        "running_total(numbers)",
        "returns the list of cumulative sums",
        ["running_total([1, 2, 3]) == [1, 3, 6]", "running_total([]) == []", "running_total([5, -5]) == [5, 0]"],
    ),
    (
        "swap_case(text)",
        "returns text with upper case letters lowered and lower case letters raised",
        ["swap_case('aB') == 'Ab'", "swap_case('') == ''", "swap_case('123') == '123'"],
    ),
    (
        "longest_word(text)",
        "returns the longest space-separated word of text (the first one on ties)",
        ["longest_word('a bbb cc') == 'bbb'", "longest_word('one two') == 'one'", "longest_word('x') == 'x'"],
    ),
    (
        "is_anagram(a, b)",
        "returns True when a and b hold the same letters in any order",
        ["is_anagram('listen', 'silent') is True", "is_anagram('ab', 'abc') is False", "is_anagram('', '') is True"],
    ),
    (
        "pairwise_sums(a, b)",
        "returns the element-wise sums of two lists of the same length",
        ["pairwise_sums([1, 2], [3, 4]) == [4, 6]", "pairwise_sums([], []) == []", "pairwise_sums([0], [-1]) == [-1]"],
    ),
    (
        "count_negatives(numbers)",
        "counts the numbers below zero",
        ["count_negatives([-1, 2, -3]) == 2", "count_negatives([]) == 0", "count_negatives([0]) == 0"],
    ),
    (
        "middle(items)",
        "returns the middle item of a list of odd length",
        ["middle([1, 2, 3]) == 2", "middle(['a']) == 'a'", "middle([5, 6, 7, 8, 9]) == 7"],
    ),
    (
        "join_with_commas(items)",
        "joins the strings of a list with ', '",
        ["join_with_commas(['a', 'b']) == 'a, b'", "join_with_commas([]) == ''", "join_with_commas(['x']) == 'x'"],
    ),
    (
        "bigger_than(numbers, limit)",
        "returns the numbers greater than limit, in order",
        ["bigger_than([1, 5, 3], 2) == [5, 3]", "bigger_than([], 0) == []", "bigger_than([1], 1) == []"],
    ),
    (
        "starts_with_vowel(word)",
        "returns True when word starts with a, e, i, o or u (either case)",
        [
            "starts_with_vowel('apple') is True",
            "starts_with_vowel('Egg') is True",
            "starts_with_vowel('tree') is False",
        ],
    ),
    (
        "absolute_difference(a, b)",
        "returns the distance between two numbers",
        ["absolute_difference(3, 7) == 4", "absolute_difference(7, 3) == 4", "absolute_difference(-1, 1) == 2"],
    ),
    (
        "power_of_two(n)",
        "returns True when n is a positive power of two",
        ["power_of_two(8) is True", "power_of_two(6) is False", "power_of_two(1) is True"],
    ),
    (
        "dedupe_keep_order(items)",
        "removes repeated items, keeping each first occurrence in order",
        [
            "dedupe_keep_order([3, 1, 3, 2, 1]) == [3, 1, 2]",
            "dedupe_keep_order([]) == []",
            "dedupe_keep_order(['a', 'a']) == ['a']",
        ],
    ),
    (
        "minutes_to_hours(minutes)",
        "returns a string 'H:MM' for a number of minutes",
        ["minutes_to_hours(90) == '1:30'", "minutes_to_hours(5) == '0:05'", "minutes_to_hours(120) == '2:00'"],
    ),
]
SPLITS = (("train", 30), ("valid", 6), ("test", 12))


def record(signature: str, does: str, asserts: list[str]) -> dict[str, str]:
    name = signature.split("(")[0]
    prompt = f"Write a Python function `{signature}` that {does}. Reply with the code in one ```python block."
    return {"prompt": prompt, "tests": "\n".join(f"assert {a}" for a in asserts) + "\n", "function": name}


def main() -> None:
    tasks = list(TASKS)
    assert len(tasks) == sum(n for _, n in SPLITS), len(tasks)
    random.Random(7).shuffle(tasks)
    OUT.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, count in SPLITS:
        lines = [json.dumps(record(*task)) for task in tasks[start : start + count]]
        (OUT / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        start += count
    print(f"wrote {len(tasks)} tasks to {OUT}")  # noqa: T201 (a script's one line of output)


if __name__ == "__main__":
    main()
