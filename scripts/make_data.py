"""Regenerate fasttune's bundled demo data (deterministic; every answer is computed or hand-checked).

    python scripts/make_data.py   # writes src/fasttune/assets/data/{instructions.jsonl,conversations.jsonl,corpus.txt}

All text here is written for fasttune and released under CC0 / Apache-2.0 (see assets/data/LICENSE).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "fasttune" / "assets" / "data"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("the United Kingdom", "London"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Mexico", "Mexico City"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"),
    ("Austria", "Vienna"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Ukraine", "Kyiv"), ("Cuba", "Havana"), ("Colombia", "Bogotá"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("New Zealand", "Wellington"), ("the Philippines", "Manila"), ("Pakistan", "Islamabad"),
    ("Saudi Arabia", "Riyadh"), ("Iceland", "Reykjavík"), ("Switzerland", "Bern"), ("Romania", "Bucharest"),
]

CONTINENTS = [
    ("France", "Europe"), ("Japan", "Asia"), ("Kenya", "Africa"), ("Brazil", "South America"),
    ("Canada", "North America"), ("Australia", "Oceania"), ("Egypt", "Africa"), ("India", "Asia"),
    ("Argentina", "South America"), ("Mexico", "North America"), ("Norway", "Europe"), ("Vietnam", "Asia"),
    ("Nigeria", "Africa"), ("Peru", "South America"), ("Poland", "Europe"), ("Thailand", "Asia"),
]

DEFINITIONS = [
    ("a prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7."),
    ("photosynthesis", "Photosynthesis is the process by which plants, algae and some bacteria use light energy to turn carbon dioxide and water into sugar, releasing oxygen."),
    ("an algorithm", "An algorithm is a finite, step-by-step procedure for solving a problem or carrying out a computation."),
    ("a noun", "A noun is a word that names a person, place, thing or idea, such as 'teacher', 'river' or 'freedom'."),
    ("a verb", "A verb is a word that describes an action, state or occurrence, such as 'run', 'be' or 'happen'."),
    ("an adjective", "An adjective is a word that describes a noun, such as 'blue', 'tall' or 'quiet'."),
    ("gravity", "Gravity is the force by which masses attract one another; on Earth it pulls objects toward the ground."),
    ("a variable in programming", "A variable is a name that refers to a value stored in memory, so a program can read or change that value later."),
    ("a function in programming", "A function is a named block of code that takes inputs, performs a task and can return a result."),
    ("an even number", "An even number is an integer that is divisible by 2 with no remainder, such as 4, 10 or -6."),
    ("an odd number", "An odd number is an integer that leaves a remainder of 1 when divided by 2, such as 3, 7 or 15."),
    ("a triangle", "A triangle is a polygon with three sides and three angles; its interior angles add up to 180 degrees."),
    ("a square", "A square is a quadrilateral with four equal sides and four right angles."),
    ("the perimeter", "The perimeter of a shape is the total length of its boundary."),
    ("the area", "The area of a flat shape is the amount of surface it covers, measured in square units."),
    ("a fraction", "A fraction represents a part of a whole and is written as one number over another, such as 3/4."),
    ("evaporation", "Evaporation is the change of a liquid into a gas at its surface, as when a puddle dries in the sun."),
    ("a mammal", "A mammal is a warm-blooded vertebrate animal that has hair or fur and feeds its young with milk."),
    ("a planet", "A planet is a large body that orbits a star, is rounded by its own gravity and has cleared its orbit of other debris."),
    ("democracy", "Democracy is a system of government in which power rests with the people, who rule directly or through elected representatives."),
    ("an atom", "An atom is the smallest unit of a chemical element, made of a nucleus of protons and neutrons surrounded by electrons."),
    ("a synonym", "A synonym is a word that means the same or nearly the same as another word, such as 'big' and 'large'."),
    ("an antonym", "An antonym is a word with the opposite meaning of another word, such as 'hot' and 'cold'."),
    ("a list in Python", "A list in Python is an ordered, changeable collection of items written in square brackets, such as [1, 2, 3]."),
    ("a dictionary in Python", "A dictionary in Python maps keys to values, written with braces, such as {'a': 1, 'b': 2}."),
    ("recursion", "Recursion is a technique in which a function solves a problem by calling itself on smaller instances of the same problem."),
    ("a compiler", "A compiler is a program that translates source code written in a programming language into another form, usually machine code."),
    ("the median", "The median of a list of numbers is the middle value once the numbers are sorted; with an even count it is the mean of the two middle values."),
    ("the mean", "The mean, or average, of a list of numbers is their sum divided by how many numbers there are."),
    ("a metaphor", "A metaphor is a figure of speech that describes something by saying it is something else, such as 'time is a thief'."),
    ("an ecosystem", "An ecosystem is a community of living things together with their physical environment, interacting as a system."),
    ("inflation", "Inflation is the general rise in prices over time, which reduces how much a unit of money can buy."),
]

GRAMMAR = [
    ("She don't like apples.", "She doesn't like apples."),
    ("Me and him went to the store.", "He and I went to the store."),
    ("Their going to the park tomorrow.", "They're going to the park tomorrow."),
    ("The cat licked it's paw.", "The cat licked its paw."),
    ("I seen that movie last week.", "I saw that movie last week."),
    ("There is three books on the table.", "There are three books on the table."),
    ("He runned to the bus stop.", "He ran to the bus stop."),
    ("We was late for the meeting.", "We were late for the meeting."),
    ("Your the best player on the team.", "You're the best player on the team."),
    ("The childs played in the garden.", "The children played in the garden."),
    ("She has went home already.", "She has gone home already."),
    ("I could of helped you.", "I could have helped you."),
    ("Less people came than expected.", "Fewer people came than expected."),
    ("Him and me are friends.", "He and I are friends."),
    ("The dog chased it's tail.", "The dog chased its tail."),
    ("They has finished their homework.", "They have finished their homework."),
    ("Everyone have a ticket.", "Everyone has a ticket."),
    ("I am more taller than my brother.", "I am taller than my brother."),
]

PASSIVE = [
    ("The chef cooked the meal.", "The meal was cooked by the chef."),
    ("The students wrote the report.", "The report was written by the students."),
    ("The wind broke the window.", "The window was broken by the wind."),
    ("Maria painted the fence.", "The fence was painted by Maria."),
    ("The committee approved the plan.", "The plan was approved by the committee."),
    ("The dog found the ball.", "The ball was found by the dog."),
    ("Engineers built the bridge.", "The bridge was built by engineers."),
    ("The teacher graded the tests.", "The tests were graded by the teacher."),
]

CODE_QA = [
    ("Write a Python function that returns the sum of a list of numbers.",
     "def total(numbers):\n    result = 0\n    for n in numbers:\n        result += n\n    return result\n\nThe built-in sum(numbers) does the same thing."),
    ("Write a Python function that checks whether a string is a palindrome.",
     "def is_palindrome(text):\n    return text == text[::-1]\n\nFor example, is_palindrome('level') returns True and is_palindrome('hello') returns False."),
    ("Write a Python function that returns the largest number in a non-empty list.",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n            best = n\n    return best"),
    ("Write a Python function that computes n factorial.",
     "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n\nFor example, factorial(5) returns 120."),
    ("Write a Python function that counts the vowels in a string.",
     "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in 'aeiou')"),
    ("How do you reverse a list called items in Python?",
     "Use items.reverse() to reverse it in place, or items[::-1] to get a new reversed list."),
    ("How do you read all lines of a text file in Python?",
     "with open('file.txt', encoding='utf-8') as f:\n    lines = f.read().splitlines()"),
    ("What is the difference between a list and a tuple in Python?",
     "A list is mutable, so you can add, remove or change items; a tuple is immutable and cannot be changed after it is created."),
    ("Write a Python function that returns the even numbers from a list.",
     "def evens(numbers):\n    return [n for n in numbers if n % 2 == 0]"),
    ("How do you get the length of a string s in Python?", "Call len(s). For example, len('hello') is 5."),
    ("Write a Python function that converts Celsius to Fahrenheit.",
     "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n\nFor example, celsius_to_fahrenheit(100) returns 212.0."),
    ("Write a Python function that returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nFor example, fib(10) returns 55."),
    ("How do you remove duplicates from a list while keeping the order in Python?",
     "Use list(dict.fromkeys(items)). Dictionaries keep insertion order, so the first occurrence of each item is kept."),
    ("Write a SQL query that selects all rows from a table named users.", "SELECT * FROM users;"),
    ("Write a SQL query that counts the rows in a table named orders.", "SELECT COUNT(*) FROM orders;"),
    ("How do you print 'Hello, world!' in JavaScript?", "console.log('Hello, world!');"),
]

EXPRESSIONS = ["3 * (4 + 2)", "10 // 3", "10 % 3", "2 ** 5", "len('banana')", "'abc' + 'def'", "sorted([3, 1, 2])",
               "max(4, 9, 2)", "min([7, 3, 8])", "abs(-12)", "'hello'.upper()", "'a,b,c'.split(',')",
               "list(range(4))", "7 / 2", "round(3.14159, 2)", "'python'[0]", "'python'[-1]", "sum([1, 2, 3, 4])",
               "bool(0)", "str(42) + '!'", "'x' * 3", "len([1, [2, 3]])", "int('17') + 3", "15 == 15.0"]

WORDS = ["apple", "river", "mountain", "cloud", "garden", "pencil", "window", "orange", "silver", "forest",
         "planet", "bridge", "candle", "rabbit", "yellow", "ocean", "thunder", "meadow", "castle", "lantern"]

SENTENCES = ["the quick brown fox jumps over the lazy dog", "practice makes perfect", "a journey of a thousand miles begins with a single step",
             "knowledge is power", "the early bird catches the worm", "fortune favours the bold",
             "actions speak louder than words", "every cloud has a silver lining", "time flies when you are having fun",
             "small steps lead to big changes"]


def number_words(n: int) -> str:
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])
    if n < 1000:
        rest = n % 100
        return ones[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    raise ValueError(n)


def fmt(x: float) -> str:
    x = round(x, 4)
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def instructions(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(instruction: str, output: str, input: str = "") -> None:
        if (instruction, input) in seen:  # random draws can repeat a question: keep the first
            return
        seen.add((instruction, input))
        rows.append({"instruction": instruction, "input": input, "output": output})

    for _ in range(30):  # addition / subtraction with worked answers
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if rng.random() < 0.5:
            add(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. Adding the hundreds, tens and ones gives {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            add(f"What is {a} - {b}?", f"{a} - {b} = {a - b}, because {b} + {a - b} = {a}.")
    for _ in range(25):
        a, b = rng.randint(2, 30), rng.choice([n for n in range(11, 60) if n % 10])
        add(f"Calculate {a} × {b} and show your work.",
            f"{a} × {b} = {a} × {b // 10 * 10} + {a} × {b % 10} = {a * (b // 10 * 10)} + {a * (b % 10)} = {a * b}.")
    for _ in range(15):
        b, q = rng.randint(2, 12), rng.randint(2, 25)
        add(f"What is {b * q} divided by {b}?", f"{b * q} ÷ {b} = {q}, because {b} × {q} = {b * q}.")
    for _ in range(12):
        p, n = rng.choice([5, 10, 15, 20, 25, 50, 75]), rng.choice([40, 60, 80, 120, 200, 240, 360, 500])
        add(f"What is {p}% of {n}?", f"{p}% of {n} is {n} × {p}/100 = {fmt(n * p / 100)}.")
    for _ in range(10):
        nums = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
        add("Find the mean of these numbers.", f"The sum is {sum(nums)} and there are {len(nums)} numbers, so the mean is "
            f"{sum(nums)} / {len(nums)} {'=' if sum(nums) % len(nums) == 0 else '≈'} {fmt(sum(nums) / len(nums))}.", ", ".join(map(str, nums)))
    for _ in range(10):
        n = rng.randint(21, 999)
        add(f"Write the number {n} in words.", number_words(n).capitalize() + ".")

    conversions = [("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
                   ("hours", "minutes", 60), ("minutes", "seconds", 60), ("litres", "millilitres", 1000),
                   ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("yards", "feet", 3)]
    for _ in range(30):
        big, small, factor = rng.choice(conversions)
        v = rng.randint(2, 40)
        if rng.random() < 0.5:
            add(f"Convert {v} {big} to {small}.", f"There are {factor} {small} in one {big[:-1] if big != 'feet' else 'foot'}, "
                f"so {v} {big} = {v} × {factor} = {v * factor} {small}.")
        else:
            add(f"How many {big} is {v * factor} {small}?", f"{v * factor} {small} ÷ {factor} = {v} {big}.")
    for c in [0, 10, 20, 25, 30, 37, 40, 100, -10, -40, 15, 5]:
        f = c * 9 / 5 + 32
        add(f"Convert {c} degrees Celsius to Fahrenheit.", f"F = C × 9/5 + 32 = {c} × 9/5 + 32 = {fmt(f)} degrees Fahrenheit.")

    for country, capital in CAPITALS:
        style = rng.randrange(3)
        if style == 0:
            add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
        elif style == 1:
            add("Name the capital city of the given country.", capital, country[0].upper() + country[1:])
        else:
            add(f"Which country has {capital} as its capital?", f"{capital} is the capital of {country}.")
    for country, continent in CONTINENTS:
        add(f"On which continent is {country}?", f"{country} is in {continent}.")

    for term, definition in DEFINITIONS:
        if rng.random() < 0.5:
            add(f"Define {term} in one sentence.", definition)
        else:
            add("Give a short definition of the following term.", definition, term)

    for wrong, right in GRAMMAR:
        add("Correct the grammar in this sentence.", right, wrong)
    for active, passive in PASSIVE:
        add("Rewrite the sentence in the passive voice.", passive, active)
    for s in SENTENCES:
        kind = rng.randrange(4)
        if kind == 0:
            add("Convert the text to uppercase.", s.upper(), s)
        elif kind == 1:
            add("Rewrite the sentence with the first letter of every word capitalised.", s.title(), s)
        elif kind == 2:
            add("Reverse the order of the words in this sentence.", " ".join(reversed(s.split())), s)
        else:
            add("How many words are in this sentence?", f"The sentence has {len(s.split())} words.", s)

    for question, answer in CODE_QA:
        add(question, answer)
    for expr in EXPRESSIONS:
        add("What does this Python expression evaluate to?", repr(eval(expr)), expr)  # noqa: S307 - our own constants

    for _ in range(20):
        nums = rng.sample(range(-20, 100), rng.randint(4, 8))
        if rng.random() < 0.5:
            add("Sort these numbers in ascending order.", ", ".join(map(str, sorted(nums))), ", ".join(map(str, nums)))
        else:
            add("Sort these numbers from largest to smallest.", ", ".join(map(str, sorted(nums, reverse=True))), ", ".join(map(str, nums)))
    for _ in range(10):
        words = rng.sample(WORDS, rng.randint(4, 7))
        add("Sort these words alphabetically.", ", ".join(sorted(words)), ", ".join(words))
    for _ in range(10):
        nums = rng.sample(range(1, 60), 6)
        add("Which numbers in the list are even?", ", ".join(str(n) for n in nums if n % 2 == 0) or "None of them are even.",
            ", ".join(map(str, nums)))
    for n in rng.sample(range(2, 100), 15):
        divisors = [d for d in range(2, n) if n % d == 0]
        if divisors:
            add(f"Is {n} a prime number?", f"No. {n} is divisible by {divisors[0]}, since {divisors[0]} × {n // divisors[0]} = {n}.")
        else:
            add(f"Is {n} a prime number?", f"Yes. {n} has no divisors other than 1 and itself.")
    for _ in range(10):
        w, h = rng.randint(2, 20), rng.randint(2, 20)
        add(f"A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?",
            f"Area = {w} × {h} = {w * h} square centimetres. Perimeter = 2 × ({w} + {h}) = {2 * (w + h)} centimetres.")
    rng.shuffle(rows)
    return rows


SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a patient maths tutor who shows each step."]


def conversations(rng: random.Random, rows: list[dict]) -> list[dict]:
    out = []
    for i in range(50):
        turns = []
        if i % 3 == 0:
            turns.append({"from": "system", "value": SYSTEMS[i % len(SYSTEMS)]})
        for row in rng.sample(rows, rng.randint(1, 3)):
            prompt = row["instruction"] + (("\n\n" + row["input"]) if row["input"] else "")
            turns.append({"from": "human", "value": prompt})
            turns.append({"from": "gpt", "value": row["output"]})
        out.append({"conversations": turns})
    return out


CORPUS_PARAGRAPHS = [
    "Fine-tuning adapts a model that has already been trained on a large amount of text to a narrower task. Instead of "
    "learning language from scratch, the model starts from weights that already encode grammar, facts and habits of "
    "reasoning, and a comparatively small dataset nudges it toward a particular style or skill.",
    "A tokenizer turns text into a sequence of integers. Byte-level byte-pair encoding starts from the 256 possible "
    "bytes and repeatedly merges the most frequent adjacent pair into a new token. Frequent words end up as single "
    "tokens, while rare words are spelled out from smaller pieces, so no input is ever out of vocabulary.",
    "Language models are trained to predict the next token. Given the tokens seen so far, the model outputs a "
    "probability for every token in the vocabulary, and the loss is the negative logarithm of the probability it gave "
    "to the token that actually came next. Averaging this cross-entropy over many positions gives the training loss.",
    "When a model is trained on conversations, the loss is usually computed only on the assistant's replies. The "
    "system prompt and the user's messages are still shown to the model, but their positions are masked out of the "
    "loss, because the goal is to learn how to answer rather than how to ask.",
    "Packing places several short documents one after another in a single row so that no compute is wasted on padding. "
    "Each document keeps its own position numbers, starting again at zero, and the attention is restricted so that a "
    "token can only look at earlier tokens of the same document.",
    "Gradient accumulation adds up the gradients of several small batches before the optimizer takes a step. To get "
    "exactly the same result as one large batch, the loss must be divided by the total number of target tokens in all "
    "of the small batches together, not by the count in each one separately.",
    "Low-rank adaptation freezes the original weight matrix and learns a small correction written as the product of "
    "two thin matrices. Because only the thin matrices are trained, the optimizer state is tiny, and the correction can "
    "later be merged back into the original weights.",
    "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit. To convert from Celsius to "
    "Fahrenheit, multiply by nine, divide by five and add thirty-two. To go back, subtract thirty-two, multiply by five "
    "and divide by nine.",
    "A metre is divided into one hundred centimetres, and a kilometre is one thousand metres. A kilogram is one "
    "thousand grams. An hour has sixty minutes and a minute has sixty seconds, so an hour has three thousand six "
    "hundred seconds, and a day of twenty-four hours has eighty-six thousand four hundred seconds.",
    "The Earth orbits the Sun once a year and turns on its axis once a day. The Moon orbits the Earth roughly once a "
    "month. Because the Earth's axis is tilted, the amount of daylight changes through the year, which is why most "
    "places have seasons.",
    "Plants make their own food through photosynthesis. Their leaves capture sunlight and use its energy to combine "
    "carbon dioxide from the air with water from the soil, producing sugar and releasing oxygen. Almost every food "
    "chain on land begins with this process.",
    "The water cycle moves water between the oceans, the air and the land. Sunlight warms the surface and water "
    "evaporates; the vapour cools as it rises and condenses into clouds; the water falls again as rain or snow and "
    "flows back through rivers and underground to the sea.",
    "A good function does one thing and has a name that says what that thing is. It takes its inputs as arguments, "
    "returns its result instead of changing distant state, and is short enough to read in one sitting. Tests then "
    "check that it returns the right answer for ordinary inputs and for the awkward edge cases.",
    "Sorting puts items in order. Simple methods such as insertion sort compare neighbouring items and move each one "
    "into place, which is quick for short lists. Methods such as merge sort split the list in half, sort each half and "
    "merge the results, which needs about n log n comparisons for n items.",
    "A prime number has exactly two divisors, one and itself. The first primes are two, three, five, seven, eleven and "
    "thirteen. Every whole number greater than one can be written as a product of primes in exactly one way, apart "
    "from the order of the factors.",
    "Writing clearly means choosing the simplest words that carry the meaning. Short sentences are easier to follow "
    "than long ones, active verbs are usually clearer than passive ones, and a paragraph works best when it makes a "
    "single point and supports it.",
    "Learning rate schedules often warm up from a small value over the first few hundred steps and then decay. The "
    "warm-up keeps the first updates, which are made while the optimizer's statistics are still poor estimates, from "
    "pushing the weights too far.",
    "Mixed precision keeps a master copy of the weights in thirty-two bit floating point while doing most of the "
    "arithmetic in sixteen bits. Bfloat16 keeps the same exponent range as float32, so it rarely overflows, but it "
    "stores fewer digits of the mantissa.",
]


def corpus(rng: random.Random) -> str:
    parts = list(CORPUS_PARAGRAPHS)
    for country, capital in CAPITALS:
        parts.append(f"{capital} is the capital of {country}. Visitors to {country} often begin their journey in "
                     f"{capital}, and many of the country's government buildings are found there.")
    for a in range(2, 13):
        parts.append(" ".join(f"{number_words(a).capitalize()} times {number_words(b)} is {number_words(a * b)}."
                              for b in range(2, 13)))
    for term, definition in DEFINITIONS:
        parts.append(definition + f" This is what people usually mean when they talk about {term}.")
    for n in range(1, 1000):  # number facts: teaches the tokenizer digits and number words
        facts = [f"The number {n} is written {number_words(n)} and is {'even' if n % 2 == 0 else 'odd'}."]
        if n % 5 == 0:
            facts.append(f"{n} is a multiple of five, and {n} divided by five is {n // 5}.")
        if n < 100:
            facts.append(f"The square of {n} is {n * n}.")
        parts.append(" ".join(facts))
    rng.shuffle(parts)
    return "\n\n".join(parts) + "\n"


def main() -> None:
    rng = random.Random(1234)
    rows = instructions(rng)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "instructions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            if not row["input"]:
                row = {"instruction": row["instruction"], "output": row["output"]}  # some rows have no input column
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(OUT / "conversations.jsonl", "w", encoding="utf-8") as f:
        for conv in conversations(rng, rows):
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
    (OUT / "corpus.txt").write_text(corpus(rng), encoding="utf-8")
    print(f"wrote {len(rows)} instructions, 50 conversations, corpus of {(OUT / 'corpus.txt').stat().st_size} bytes to {OUT}")


if __name__ == "__main__":
    main()
