"""Writes data/smollm2_prompts.jsonl and data/smollm2_heldout.jsonl: the short instructions examples/smollm2.toml
distils SmolLM2-135M-Instruct on. Hand-written for this example, of several kinds (arithmetic, facts, definitions,
opposites, rewriting, translation, lists, classification, code, everyday advice); every 6th prompt of each kind is held
out, so both files hold every kind. Run: python examples/make_smollm2_prompts.py"""

from __future__ import annotations

import json
from pathlib import Path

KINDS: dict[str, list[str]] = {
    "arithmetic": [
        "What is 12 + 7?", "What is 45 - 18?", "What is 6 times 8?", "What is 81 divided by 9?", "What is 15 + 27?",
        "What is 100 - 64?", "What is 9 times 7?", "What is 144 divided by 12?", "What is 33 + 48?",
        "What is 250 - 125?", "What is 11 times 11?", "What is 56 divided by 7?", "What is 19 + 23?",
        "What is 90 - 37?", "What is 4 times 25?", "What is 72 divided by 8?", "What is 123 + 456?",
        "What is 1000 - 1?", "What is 3 times 14?", "What is 60 divided by 5?", "Add 8 and 13.",
        "Subtract 9 from 30.", "Multiply 7 by 6.", "Divide 48 by 6.", "What is half of 50?", "What is double 35?",
        "What is 10 percent of 200?", "What is the square of 9?", "What is 2 to the power of 5?",
        "If I have 5 apples and eat 2, how many are left?",
    ],
    "facts": [
        "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
        "What is the capital of Canada?", "What is the capital of Spain?", "What is the capital of Germany?",
        "What is the capital of Egypt?", "What is the capital of Brazil?", "How many days are in a week?",
        "How many months are in a year?", "How many legs does a spider have?", "How many continents are there?",
        "What color is the sky on a clear day?", "What do bees make?", "What is the largest planet in our solar system?",
        "What planet do we live on?", "What is the boiling point of water in Celsius?", "What gas do plants take in?",
        "What is the freezing point of water in Celsius?", "Which animal is known as the king of the jungle?",
        "What is the largest ocean on Earth?", "How many hours are in a day?", "How many minutes are in an hour?",
        "What is the tallest animal?", "What do cows drink?", "Which season comes after winter?",
        "What is the opposite of north?", "What language is spoken in Brazil?", "Who wrote Romeo and Juliet?",
        "What is the chemical symbol for water?",
    ],
    "definitions": [
        "Define the word 'happy' in one sentence.", "What does 'enormous' mean?", "Explain what a noun is.",
        "What is a verb?", "What is photosynthesis, in one sentence?", "What is gravity, briefly?",
        "What is a triangle?", "Define 'democracy' in one sentence.", "What is a computer?", "What is a river?",
        "Explain what rain is in one sentence.", "What is a library?", "What does 'ancient' mean?",
        "What is an island?", "Define 'friendship' briefly.", "What is a vaccine, in one sentence?",
        "What is a mammal?", "What does a thermometer measure?", "What is an adjective?", "What is a volcano?",
        "Explain what a calendar is.", "What does 'brave' mean?", "What is electricity, briefly?",
        "What is a desert?", "Define 'recycle'.", "What is a planet?", "What does 'fragile' mean?",
        "What is a dictionary used for?", "What is a habit?", "Explain what a map is.",
    ],
    "opposites": [
        "What is the opposite of hot?", "What is the opposite of big?", "What is the opposite of fast?",
        "What is the opposite of happy?", "What is the opposite of light?", "What is the opposite of up?",
        "What is the opposite of early?", "What is the opposite of full?", "What is the opposite of old?",
        "What is the opposite of open?", "Give a synonym for 'quick'.", "Give a synonym for 'smart'.",
        "Give a synonym for 'big'.", "Give a synonym for 'begin'.", "Give a synonym for 'angry'.",
        "Give a synonym for 'tiny'.", "Give a synonym for 'happy'.", "Give a synonym for 'easy'.",
        "What is the opposite of strong?", "What is the opposite of day?", "What is the opposite of win?",
        "What is the opposite of buy?", "What is the opposite of loud?", "What is the opposite of wet?",
        "Give a synonym for 'look'.", "Give a synonym for 'talk'.", "What is the opposite of inside?",
        "What is the opposite of always?", "Give a synonym for 'shut'.", "What is the opposite of rich?",
    ],
    "rewrite": [
        "Make this sentence more polite: Give me the salt.", "Fix the grammar: She go to school every day.",
        "Rewrite in the past tense: I walk to the park.", "Make this shorter: The meeting that we had was very long.",
        "Fix the spelling: I recieved your leter.", "Rewrite formally: Hey, what's up?",
        "Rewrite in the future tense: We eat dinner at six.", "Fix the grammar: They was late.",
        "Make this sentence more exciting: The dog ran.", "Rewrite in plural: The cat sleeps.",
        "Fix the grammar: He don't like apples.", "Rewrite in the passive voice: The chef cooked the meal.",
        "Make this more polite: Close the door.", "Fix the spelling: The wether is beautifull.",
        "Rewrite in the past tense: She writes a letter.", "Rewrite formally: Thanks a lot, buddy.",
        "Fix the grammar: Me and him went home.", "Make this shorter: In my personal opinion, I think it is good.",
        "Rewrite in plural: A child plays outside.", "Turn this into a question: You like music.",
        "Turn this into a question: The train is late.", "Fix the grammar: There is three books.",
        "Rewrite in the present tense: I played chess.", "Make this more polite: I want water.",
        "Fix the spelling: I beleive it is tru.", "Rewrite in the negative: I like coffee.",
        "Rewrite in the negative: She is tired.", "Combine into one sentence: It rained. We stayed home.",
        "Combine into one sentence: I was hungry. I ate an apple.", "Rewrite formally: Gonna be late, sorry.",
    ],
    "translation": [
        "Translate 'hello' into French.", "Translate 'thank you' into Spanish.", "Translate 'good morning' into German.",
        "Translate 'cat' into French.", "Translate 'water' into Spanish.", "Translate 'house' into German.",
        "Translate 'goodbye' into Italian.", "Translate 'friend' into Spanish.", "Translate 'book' into French.",
        "Translate 'yes' into German.", "Translate 'please' into French.", "Translate 'dog' into Spanish.",
        "Translate 'red' into Italian.", "Translate 'apple' into French.", "Translate 'one, two, three' into Spanish.",
        "Translate 'I love you' into French.", "Translate 'good night' into Spanish.", "Translate 'bread' into French.",
        "Translate 'sun' into Spanish.", "Translate 'school' into German.", "What does 'merci' mean in English?",
        "What does 'hola' mean in English?", "What does 'danke' mean in English?", "What does 'gato' mean in English?",
        "What does 'bonjour' mean in English?", "What does 'agua' mean in English?", "What does 'Hund' mean in English?",
        "What does 'libro' mean in English?", "Translate 'How are you?' into Spanish.", "Translate 'milk' into French.",
    ],
    "lists": [
        "List three fruits.", "Name three colors.", "List three animals that live in the sea.",
        "Name three vegetables.", "List three things you can find in a kitchen.", "Name three musical instruments.",
        "List three sports played with a ball.", "Name three planets.", "List three types of weather.",
        "Name three countries in Europe.", "List three things that are cold.", "Name three farm animals.",
        "List three school subjects.", "Name three kinds of trees.", "List three things people wear in winter.",
        "Name three shapes.", "List three ways to travel.", "Name three birds.", "List three breakfast foods.",
        "Name three jobs.", "List three parts of a plant.", "Name three insects.", "List three hobbies.",
        "Name three body parts.", "List three things in the sky.", "Name three drinks.",
        "List three things you need to bake a cake.", "Name three tools.", "List the days of the weekend.",
        "Name three rooms in a house.",
    ],
    "classify": [
        "Is this review positive or negative? 'I loved this movie!'",
        "Is this review positive or negative? 'The food was cold and bland.'",
        "Is this sentence a question or a statement? 'Where is the station?'",
        "Is a tomato a fruit or a vegetable?", "Is a whale a fish or a mammal?", "Is ice hot or cold?",
        "Is this positive or negative? 'What a wonderful day.'", "Is this positive or negative? 'I hate waiting.'",
        "Is the number 7 odd or even?", "Is the number 12 odd or even?", "Is a penguin a bird?",
        "Is the sun a star or a planet?", "Is this a fact or an opinion? 'Paris is in France.'",
        "Is this a fact or an opinion? 'Pizza is the best food.'", "Is 'run' a noun or a verb?",
        "Is 'blue' a noun or an adjective?", "Is a bicycle faster than a car?", "Is glass transparent?",
        "Is this review positive or negative? 'Terrible service, never again.'",
        "Is this review positive or negative? 'Great value and friendly staff.'", "Is 15 greater than 51?",
        "Is a spider an insect?", "Is water wet?", "Which is heavier, a kilogram of feathers or a kilogram of iron?",
        "Is the number 9 prime?", "Is the number 13 prime?", "Is a lemon sweet or sour?", "Is snow white or black?",
        "Is this a question or a command? 'Sit down.'", "Is Monday a weekday or a weekend day?",
    ],
    "code": [
        "Write a Python function that adds two numbers.", "Write a Python function that returns the square of x.",
        "How do you print 'hello' in Python?", "Write a Python list of three colors.",
        "How do you get the length of a list in Python?", "Write a Python loop that prints 1 to 5.",
        "How do you make a comment in Python?", "Write a Python function that checks if a number is even.",
        "How do you convert a string to an integer in Python?", "Write a Python dictionary with two keys.",
        "How do you add an item to a list in Python?", "Write a Python function that returns the larger of two numbers.",
        "How do you make a string uppercase in Python?", "Write a Python if statement that checks if x is positive.",
        "How do you read a file in Python?", "Write a Python function that reverses a string.",
        "How do you import the math module in Python?", "How do you round a number in Python?",
        "Write a SQL query that selects all rows from a table named users.", "How do you declare a variable in JavaScript?",
        "Write a Python function that returns the sum of a list.", "How do you sort a list in Python?",
        "What does the len function do in Python?", "Write a Python one-liner that squares each number in a list.",
        "How do you check the type of a variable in Python?", "How do you join a list of strings in Python?",
        "Write a Python function that greets a person by name.", "How do you write a while loop in Python?",
        "What is a boolean in programming?", "How do you find the maximum of a list in Python?",
    ],
    "advice": [
        "Give one tip for sleeping better.", "Give one tip for saving money.", "How can I stay hydrated?",
        "Give one tip for studying.", "How do I make a cup of tea?", "Give one tip for staying healthy.",
        "How can I be more productive in the morning?", "Give one tip for learning a new language.",
        "How do I boil an egg?", "Give one tip for a job interview.", "How can I reduce stress?",
        "Give one tip for writing clearly.", "How do I keep plants alive?", "Give one tip for making friends.",
        "How do I wash my hands properly?", "Give one tip for running a first 5k.", "How do I clean a window?",
        "Give one tip for cooking rice.", "How can I remember names better?", "Give one tip for public speaking.",
        "Suggest a name for a pet cat.", "Suggest a name for a bakery.", "Suggest a title for a story about a dragon.",
        "Write a short greeting for a birthday card.", "Write a one-sentence thank-you note.",
        "Write a short motto for a school.", "Suggest a healthy snack.", "Suggest a fun weekend activity.",
        "Write a one-line slogan for a bike shop.", "Suggest a gift for a friend who likes books.",
    ],
}


def main() -> None:
    root = Path(__file__).resolve().parent.parent / "data"
    train, held = [], []
    for kind, prompts in KINDS.items():
        assert len(prompts) == len(set(prompts)), kind
        for i, p in enumerate(prompts):
            (held if i % 6 == 5 else train).append({"prompt": p, "kind": kind})
    for name, rows in (("smollm2_prompts.jsonl", train), ("smollm2_heldout.jsonl", held)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{root / name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
