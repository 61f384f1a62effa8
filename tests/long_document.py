"""A long document whose subjects are known: sections on honeybees, volcanoes and chess.

Sentences are built from templates and word lists with a seeded RNG, so the text is varied (no
sentence repeats) and reproducible, and every paragraph is plainly about its section's subject.
"""

from __future__ import annotations

import random

TOPICS = {
    "honeybees": {
        "title": "Honeybees",
        "subjects": ["Honeybees", "Worker bees", "Forager bees", "Young nurse bees", "Wild honeybees",
                     "The bees of a honeybee colony", "Honeybees in a hive", "Honeybees of Europe"],
        "facts": ["collect nectar and pollen from {flower} flowers", "make honey from the nectar of {flower} blossoms",
                  "build wax combs of six-sided cells inside the hive", "dance to show other bees where {flower} "
                  "flowers grow", "guard the entrance of the hive against wasps", "keep the brood warm during {season}",
                  "fan their wings to cool the hive on hot {season} days", "store honey to survive the long {season}",
                  "pollinate {flower} plants and many food crops", "feed royal jelly to the larvae",
                  "swarm to found a new colony in {season}", "fly up to {number} kilometres to find {flower} flowers"],
        "details": ["Farmers depend on honeybees to pollinate their fields.",
                    "The honey they make keeps for years without spoiling.",
                    "A strong hive can hold {number} thousand bees.",
                    "The beeswax from the hive is used for candles.",
                    "Scientists study how honeybees find their way home.",
                    "Honeybees sting only to defend their hive."],
    },
    "volcanoes": {
        "title": "Volcanoes",
        "subjects": ["Volcanoes", "Active volcanoes", "Volcanoes such as {name}", "Dormant volcanoes",
                     "Shield volcanoes", "Stratovolcanoes", "Underwater volcanoes", "Young volcanoes"],
        "facts": ["erupt when molten rock rises from deep inside the Earth", "pour out rivers of hot lava that "
                  "glow {colour}", "throw ash and gas {number} kilometres into the sky", "form new islands in the "
                  "ocean over thousands of years", "build tall mountains from layers of lava and ash",
                  "rumble with small earthquakes before an eruption", "release steam and sulfur gas from vents near "
                  "{name}", "bury nearby towns under grey ash", "create rich soil where farmers grow {crop}",
                  "heat underground water into hot springs and geysers", "grow {colour} with glowing magma at night",
                  "sit above hot spots and the edges of tectonic plates"],
        "details": ["Volcanologists measure gas and ground movement to warn people living near volcanoes.",
                    "The eruption of {name} was seen from {number} kilometres away.",
                    "Cooled lava turns into hard black basalt rock.",
                    "Volcanic ash can stop aircraft from flying.",
                    "Magma is called lava once it reaches the surface of a volcano.",
                    "Some volcanoes have been quiet for {number} hundred years."],
    },
    "chess": {
        "title": "Chess",
        "subjects": ["Chess", "A game of chess", "Modern chess", "Tournament chess", "Classical chess",
                     "Club chess", "Correspondence chess", "Blitz chess"],
        "facts": ["is played on a board of sixty-four black and white squares", "begins with each player moving "
                  "sixteen chess pieces", "ends in checkmate when the king cannot escape", "rewards players who "
                  "control the centre of the chessboard", "uses openings such as the {opening}",
                  "trains memory and planning through long chess games", "was studied for years by {player}",
                  "lets the knight jump in an L shape across the board", "counts the queen as the strongest piece",
                  "lets a pawn become a queen on the last rank", "is timed with a chess clock in tournaments",
                  "is analysed by chess engines that search millions of moves"],
        "details": ["The world chess championship has been played since {year}.",
                    "Castling moves the king and a rook in one chess move.",
                    "A chess game can end in a draw by stalemate.",
                    "{player} won a famous chess match with the {opening}.",
                    "Chess clubs meet in schools and libraries to play chess.",
                    "Every chess player starts by learning how each piece moves."],
    },
}

FILL = {
    "flower": ["clover", "lavender", "apple", "sunflower", "heather", "acacia", "orange", "thyme"],
    "season": ["winter", "summer", "spring", "autumn"],
    "number": [str(n) for n in (3, 5, 8, 12, 20, 40, 60)],
    "colour": ["red", "orange", "bright yellow", "deep red"],
    "name": ["Etna", "Vesuvius", "Kilauea", "Fuji", "Krakatoa", "Stromboli"],
    "crop": ["grapes", "coffee", "rice", "olives"],
    "player": ["Magnus Carlsen", "Garry Kasparov", "Bobby Fischer", "Judit Polgar", "Anatoly Karpov"],
    "opening": ["Sicilian Defence", "Queen's Gambit", "Ruy Lopez", "French Defence", "King's Indian"],
    "year": ["1886", "1948", "1972"],
}


def fill(template: str, rng: random.Random) -> str:
    out = template
    for key, choices in FILL.items():
        while "{" + key + "}" in out:
            out = out.replace("{" + key + "}", rng.choice(choices), 1)
    return out


OPENERS = ["", "", "", "In many places, ", "Every year, ", "As a rule, ", "According to experts, ",
           "In {season}, ", "Often, ", "For this reason, ", "Around the world, ", "Most of the time, "]


def paragraph(topic: dict, rng: random.Random, seen: set[str]) -> str:
    sentences, length = [], rng.randint(4, 7)
    while len(sentences) < length:
        if rng.random() < 0.2:
            s = fill(rng.choice(topic["details"]), rng)
        else:
            opener = fill(rng.choice(OPENERS), rng)
            subject = fill(rng.choice(topic["subjects"]), rng)
            fact = fill(rng.choice(topic["facts"]), rng)
            s = f"{opener}{subject[0].lower() if opener else subject[0]}{subject[1:]} {fact}."
        if s not in seen:  # no sentence twice in the document
            seen.add(s)
            sentences.append(s)
    return " ".join(sentences)


def long_document(paragraphs_per_topic: int = 120, seed: int = 7) -> str:
    """Three sections (honeybees, volcanoes, chess) of `paragraphs_per_topic` paragraphs each."""
    rng = random.Random(seed)
    seen: set[str] = set()
    sections = []
    for topic in TOPICS.values():
        paras = [paragraph(topic, rng, seen) for _ in range(paragraphs_per_topic)]
        sections.append(f"{topic['title']}\n\n" + "\n\n".join(paras))
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    print(long_document())
