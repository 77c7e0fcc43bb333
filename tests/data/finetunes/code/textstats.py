"""Count words, lines and characters of a text file, like wc."""

import sys
from collections import Counter


def read_lines(path):
    with open(path, encoding="utf-8") as handle:
        return handle.readlines()


def word_counts(lines):
    counts = Counter()
    for line in lines:
        for word in line.split():
            counts[word.lower().strip(".,;:!?\"'")] += 1
    return counts


def summary(lines):
    words = sum(len(line.split()) for line in lines)
    characters = sum(len(line) for line in lines)
    return {"lines": len(lines), "words": words, "characters": characters}


def main(arguments):
    if len(arguments) != 1:
        print("usage: textstats.py FILE", file=sys.stderr)
        return 2
    lines = read_lines(arguments[0])
    for key, value in summary(lines).items():
        print(f"{key:>12}: {value}")
    for word, count in word_counts(lines).most_common(10):
        print(f"{count:6d} {word}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
