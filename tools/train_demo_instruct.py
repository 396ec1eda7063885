"""Train aot's embedded demo *instruct* model: the base demo model (aot/demo/model, 3.5 M parameters)
fine-tuned on synthetic, seeded conversations rendered with the Llama 3.2 Instruct chat template
(aot/chat_templates/llama3.2.jinja), so that `aot run --chat` and JSON tool calling can be seen
working on a fresh clone. The tokenizer gains Llama 3's remaining chat special tokens (ids 2048-2055);
ids 0-2047 are the base tokenizer's. Writes a Hugging Face folder (config.json, generation_config.json,
model.safetensors in bf16, tokenizer.json, tokenizer_config.json with the chat template), training.json
(command, seed, losses, held-out tool-call exact match, timings, versions) and a README.

    .venv/bin/python tools/train_demo_instruct.py --out aot/demo/instruct   # about 20 minutes on 2 cores

Conversations: greetings, "what can you do", short Python functions, single JSON tool calls out of 2-4
offered tools (from a pool of 9 OpenAI-style function schemas) with or without the tool's result and a
final answer in words, and 2-3 exchange conversations that lean on their history. Loss is taken on
assistant tokens only (content and the closing <|eot_id|>). Some values (cities, names, titles, ...)
are kept out of training altogether so that the evaluation can also show copying of unseen values.

Needs the test extra (transformers) for training only; aot itself never imports transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from train_demo import adamw_cosine  # (tools/ is on sys.path when this script runs)

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "aot" / "demo" / "model"
TEMPLATE = REPO / "aot" / "chat_templates" / "llama3.2.jinja"
BOS_TOKEN, EOT_TOKEN = "<|begin_of_text|>", "<|eot_id|>"
NEW_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(4)]  # ids 2048..2055
BOS, EOS, EOT, EOM = 0, 1, 2, 2050
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# Value pools. Every HOLDOUT_EVERY-th value of a pool is never used in training ("unseen" values),
# so the evaluation can tell copying from the context apart from recalling a memorised value.
HOLDOUT_EVERY = 7

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Oslo", "Cairo", "Lagos",
          "Nairobi", "Mumbai", "Delhi", "Seoul", "Beijing", "Sydney", "Toronto", "Chicago", "Boston",
          "Denver", "Austin", "Seattle", "Miami", "Dublin", "Vienna", "Prague", "Warsaw", "Athens",
          "Istanbul", "Dubai", "Bangkok", "Jakarta", "Manila", "Lima", "Bogota", "Santiago", "Havana",
          "Montreal", "Vancouver", "Zurich", "Geneva", "Munich", "Hamburg", "Amsterdam", "Brussels",
          "Stockholm", "Helsinki", "Copenhagen", "Budapest", "Kyoto", "Osaka", "Singapore", "Hanoi",
          "Casablanca", "Tunis", "Accra", "Quito", "Caracas", "Mexico City", "New York", "San Francisco",
          "Cape Town", "Buenos Aires", "Rio de Janeiro", "Los Angeles", "Edinburgh", "Krakow", "Porto",
          "Seville", "Marseille"]
NAMES = ["Anna", "Ben", "Carlos", "Dana", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kate",
         "Liam", "Maria", "Noah", "Olga", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
         "Wei", "Xavier", "Yara", "Zoe", "Ahmed", "Bella", "Chen", "Diego", "Emma", "Felix", "Gina",
         "Hassan", "Ivy", "Jon", "Kim", "Leo", "Mia", "Nina", "Oscar", "Paul", "Rita", "Sara", "Tom",
         "Uma", "Victor", "Will", "Yuki", "Aisha", "Bruno", "Clara", "David", "Eva", "Frank", "Hana",
         "Ivan", "Julia", "Karl", "Lena", "Marco", "Nadia", "Pedro", "Ravi", "Sofia", "Theo", "Alex"]
TITLES = ["Team sync", "Dentist appointment", "Project review", "Yoga class", "Budget meeting",
          "Piano lesson", "Code review", "Birthday party", "Book club", "Sprint planning", "Doctor visit",
          "Coffee chat", "Gym session", "Parent meeting", "Job interview", "Team dinner", "Design review",
          "Car service", "Haircut", "Movie night", "Study group", "Standup", "Lunch", "Quarterly planning",
          "Board meeting", "Tennis practice", "Football match", "Guitar lesson", "Vet appointment",
          "Flight check-in", "Date night", "Game night", "Cooking class", "Product demo", "One on one",
          "Hackathon", "Farewell drinks", "Language exchange", "Running club", "Client call",
          "Retrospective", "Workshop", "Town hall", "Swimming", "Parents evening"]
MESSAGES = ["I'm running late", "see you at noon", "dinner is ready", "call me back", "happy birthday",
            "the meeting moved to 3pm", "can you pick up milk", "I landed safely", "thanks for today",
            "good luck on your exam", "I'll be home by 7", "don't forget the keys", "the train is delayed",
            "let's meet at the cafe", "I'm on my way", "can we talk later", "the package arrived",
            "see you tomorrow", "lunch is on me", "the kids are asleep", "bring an umbrella",
            "the report is done", "I miss you", "call the plumber", "we won the game", "I'm at the station",
            "please feed the cat", "the door code is 4512", "running ten minutes late", "I bought the tickets",
            "see you at the gym", "how was your day", "congratulations on the new job", "the wifi is down",
            "I left my phone at home", "dinner at 8 tonight", "the store closes at 9"]
TASKS = ["buy milk", "call the bank", "water the plants", "renew my passport", "pay rent", "book flights",
         "clean the garage", "email the landlord", "pick up the laundry", "fix the bike", "read chapter 3",
         "send the invoice", "buy a birthday gift", "walk the dog", "take out the trash", "cancel the gym",
         "backup my laptop", "order new glasses", "study for the exam", "wash the car", "buy bread",
         "call grandma", "update my resume", "file the taxes", "plan the trip", "return the library books",
         "charge the camera", "schedule a haircut", "buy coffee beans", "reply to Omar",
         "clean the kitchen", "pay the phone bill", "change the bed sheets", "book a dentist visit"]
QUERIES = ["recipes", "tax return", "project ideas", "meeting notes", "travel plans", "book list",
           "gift ideas", "workout plan", "grocery list", "passwords policy", "garden", "budget",
           "movie list", "onboarding", "interview questions", "car insurance", "vacation", "reading list",
           "birthday plans", "home repairs", "python tips", "client feedback", "holiday schedule",
           "wedding", "lecture 5", "research", "podcast ideas", "moving house", "team goals", "japan trip"]
NOTE_TITLES = ["Weekly plan", "Ideas", "Shopping", "Summary", "Draft", "Checklist", "Todo", "Overview",
               "Questions", "Links", "Journal", "Call notes", "Brainstorm", "Schedule", "Budget sheet"]
SYMBOLS = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "META", "NFLX", "IBM", "INTC", "AMD", "ORCL",
           "SAP", "SONY", "NKE", "KO", "PEP", "DIS", "V", "JPM", "BA", "UBER", "SHOP", "ADBE"]
CURRENCIES = {"USD": "dollars", "EUR": "euros", "GBP": "pounds", "JPY": "yen", "CHF": "francs",
              "INR": "rupees", "KRW": "won", "CAD": "canadian dollars", "AUD": "australian dollars",
              "MXN": "pesos", "SEK": "kronor", "CNY": "yuan", "BRL": "reais", "ZAR": "rand"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tomorrow", "today"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy", "partly cloudy"]
ASSISTANT_NAMES = ["Pip", "Nova", "Echo", "Milo", "Luna", "Bolt", "Iris", "Juno", "Kiwi", "Orbit",
                   "Pixel", "Sage", "Tilly", "Zed", "Ada", "Basil", "Cleo", "Dot", "Fern", "Gus"]
FN_VERBS = ["get", "calc", "compute", "make", "find", "do", "my", "to", "apply", "eval", "run", "build"]
FN_NOUNS = ["value", "result", "total", "number", "square", "thing", "answer", "output", "data", "item",
            "score", "sum", "it", "x", "num", "stuff"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


class Pools:
    """Draws values from the training share of each pool, or from the held-out (unseen) share."""

    def __init__(self, rng: random.Random, unseen: bool = False):
        self.rng = rng
        pick = (lambda i: i % HOLDOUT_EVERY == 3) if unseen else (lambda i: i % HOLDOUT_EVERY != 3)
        split = lambda pool: [v for i, v in enumerate(pool) if pick(i)]  # noqa: E731
        self.cities, self.names, self.titles = split(CITIES), split(NAMES), split(TITLES)
        self.messages, self.tasks, self.queries = split(MESSAGES), split(TASKS), split(QUERIES)
        self.symbols = split(SYMBOLS)
        self.assistant_names = split(ASSISTANT_NAMES)

    def choice(self, seq):
        return self.rng.choice(seq)


# ----------------------------------------------------------------------------------------------
# Tools: OpenAI-style function schemas.
def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = {
    "get_weather": _fn("get_weather", "Get the current weather in a city.", {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    "create_event": _fn("create_event", "Create a calendar event.", {
        "title": {"type": "string"}, "day": {"type": "string"}, "time": {"type": "string"},
        "attendees": {"type": "array", "items": {"type": "string"}}}, ["title", "day", "time"]),
    "send_message": _fn("send_message", "Send a text message to a contact.", {
        "to": {"type": "string", "description": "Contact name"}, "text": {"type": "string"}}, ["to", "text"]),
    "set_timer": _fn("set_timer", "Start a countdown timer.", {
        "minutes": {"type": "integer"}}, ["minutes"]),
    "search_notes": _fn("search_notes", "Search the user's notes.", {
        "query": {"type": "string"}}, ["query"]),
    "convert_currency": _fn("convert_currency", "Convert an amount between currencies.", {
        "amount": {"type": "number"}, "from": {"type": "string", "description": "ISO currency code"},
        "to": {"type": "string", "description": "ISO currency code"}}, ["amount", "from", "to"]),
    "get_time": _fn("get_time", "Get the local time in a city.", {
        "city": {"type": "string"}}, ["city"]),
    "add_todo": _fn("add_todo", "Add a task to the to-do list.", {
        "task": {"type": "string"}, "due": {"type": "string"}}, ["task"]),
    "get_stock_price": _fn("get_stock_price", "Get the latest price of a stock.", {
        "symbol": {"type": "string", "description": "Ticker symbol"}}, ["symbol"]),
}


def _time(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return f"{rng.randint(7, 20)}:{rng.choice([0, 15, 30, 45]):02d}"
    h = rng.randint(1, 12)
    return f"{h}{rng.choice(['am', 'pm'])}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def tool_request(p: Pools, name: str, follow_up: bool = False) -> tuple[str, dict, dict, str]:
    """(user text, call arguments, tool result, final answer) for one use of tool `name`.
    follow_up: a short second request in a conversation that already used this tool."""
    r = p.rng
    if name == "get_weather":
        city = p.choice(p.cities)
        unit = r.choice([None, None, None, "celsius", "fahrenheit"])
        if follow_up:
            user = r.choice(["And in {c}?", "What about {c}?", "How about {c}?", "And {c}?",
                             "Now check {c}."]).format(c=city)
            unit = None
        elif unit:
            user = r.choice(["What's the weather in {c} in {u}?", "Weather in {c}, in {u} please.",
                             "Tell me the temperature in {c} in {u}.", "How hot is it in {c}? Use {u}.",
                             "Give me the weather for {c} in {u}."]).format(c=city, u=unit)
        else:
            user = r.choice(["What's the weather in {c}?", "What is the weather like in {c} today?",
                             "Is it raining in {c}?", "How warm is it in {c}?", "Tell me the weather for {c}.",
                             "weather {c}", "Check the weather in {c} please.", "Do I need a coat in {c}?",
                             "What's it like outside in {c}?", "Weather forecast for {c}?"]).format(c=city)
        args = {"city": city} | ({"unit": unit} if unit else {})
        u = unit or "celsius"
        t = r.randint(-10, 38) if u == "celsius" else r.randint(15, 100)
        cond = r.choice(CONDITIONS)
        result = {"city": city, "temperature": t, "unit": u, "condition": cond}
        answer = r.choice(["It is {t} degrees {U} and {w} in {c}.", "In {c} it is {w} and {t} degrees {U}.",
                           "Right now {c} is {w} at {t} degrees {U}."]).format(t=t, U=_cap(u), w=cond, c=city)
    elif name == "create_event":
        title, day, tm = p.choice(p.titles), r.choice(DAYS), _time(r)
        people = r.sample(p.names, r.choice([0, 0, 1, 2, 3]))
        on = "" if day in ("tomorrow", "today") else "on "
        w = f" with {_and(people)}" if people else ""
        user = r.choice([
            "Schedule {T} {on}{d} at {t}{w}.", "Create an event called {T} for {d} at {t}{w}.",
            "Add {T} to my calendar {on}{d} at {t}{w}.", "Put \"{T}\" in my calendar {on}{d} at {t}{w}.",
            "Book {T} {on}{d} at {t}{w} please.", "Can you set up {T} {on}{d} at {t}{w}?",
            "New event: {T}, {d}, {t}{w}."]).format(T=title, on=on, d=day, t=tm, w=w)
        args = {"title": title, "day": day, "time": tm} | ({"attendees": people} if people else {})
        result = {"status": "created", "event_id": f"evt_{r.randint(100, 999)}"}
        answer = r.choice(["Done! {T} is on your calendar {on}{d} at {t}{w}.",
                           "I created {T} {on}{d} at {t}{w}."]).format(T=title, on=on, d=day, t=tm, w=w)
    elif name == "send_message":
        to, text = p.choice(p.names), p.choice(p.messages)
        if follow_up:
            user = r.choice(["Also tell {n} {m}.", "Now send {n}: {m}", "And message {n} saying {m}."])
        else:
            user = r.choice(["Send a message to {n} saying {m}.", "Text {n}: {m}", "Message {n} \"{m}\"",
                             "Tell {n} {m}.", "Send {n} a text: {m}", "Can you text {n} that {m}?",
                             "Please message {n}: {m}", "Send \"{m}\" to {n}."])
        user = user.format(n=to, m=text)
        args = {"to": to, "text": text}
        result = {"status": "sent", "to": to}
        answer = r.choice(["Your message to {n} has been sent.", "Sent! {n} will get your message.",
                           "Done, I sent it to {n}."]).format(n=to)
    elif name == "set_timer":
        m = r.choice([r.randint(1, 15), r.randint(1, 60), r.randint(1, 120), r.choice([5, 10, 15, 20, 30, 45, 60])])
        mins = "minute" if m == 1 else "minutes"
        if follow_up:
            user = r.choice(["Make it {m} {s} instead.", "Actually, {m} {s}.", "Change it to {m} {s}."])
        else:
            user = r.choice(["Set a timer for {m} {s}.", "Timer for {m} {s} please", "Start a {m} minute timer.",
                             "Can you set a {m}-minute timer?", "Count down {m} {s}.", "Set timer {m} min",
                             "I need a timer for {m} {s}.", "Start a timer: {m} {s}."])
        user = user.format(m=m, s=mins)
        args = {"minutes": m}
        result = {"status": "running", "minutes": m}
        answer = r.choice(["Your timer for {m} {s} is running.", "Timer set for {m} {s}.",
                           "OK, {m} {s} starting now."]).format(m=m, s=mins)
    elif name == "search_notes":
        q = p.choice(p.queries)
        user = r.choice(["Search my notes for {q}.", "Find my notes about {q}.", "Do I have any notes on {q}?",
                         "Look up {q} in my notes.", "Search notes: {q}", "What did I write about {q}?",
                         "Find notes on {q} please."]).format(q=q)
        args = {"query": q}
        k = r.choice([0, 1, 1, 2, 2])
        titles = [f"{_cap(q)} - {t}" for t in r.sample(NOTE_TITLES, k)]
        result = {"results": [{"title": t} for t in titles]}
        answer = ["I found no notes about {q}.".format(q=q), "I found one note: {a}.", "I found 2 notes: {a} and {b}."][k]
        answer = answer.format(a=titles[0] if titles else "", b=titles[1] if k > 1 else "")
    elif name == "convert_currency":
        f, t = r.sample(list(CURRENCIES), 2)
        amount = r.choice([r.randint(1, 100), r.randint(1, 5000), r.choice([10, 20, 50, 100, 200, 500, 1000]),
                           round(r.uniform(1, 500), r.choice([1, 2]))])
        if r.random() < 0.6:
            fs, ts = f, t
        else:
            fs, ts = CURRENCIES[f], CURRENCIES[t]
        user = r.choice(["Convert {a} {f} to {t}.", "How much is {a} {f} in {t}?", "What is {a} {f} in {t}?",
                         "{a} {f} to {t}?", "Change {a} {f} into {t} please."]).format(a=amount, f=fs, t=ts)
        args = {"amount": amount, "from": f, "to": t}
        value = round(amount * r.uniform(0.01, 150), 2)
        result = {"amount": amount, "from": f, "to": t, "result": value}
        answer = r.choice(["{a} {f} is {v} {t}.", "That is {v} {t}."]).format(a=amount, f=f, t=t, v=value)
    elif name == "get_time":
        city = p.choice(p.cities)
        if follow_up:
            user = r.choice(["And in {c}?", "What about {c}?", "And the time in {c}?"]).format(c=city)
        else:
            user = r.choice(["What time is it in {c}?", "Current time in {c}?", "Tell me the local time in {c}.",
                             "What's the time in {c} right now?", "time in {c}"]).format(c=city)
        args = {"city": city}
        tm = f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"
        result = {"city": city, "time": tm}
        answer = r.choice(["It is {t} in {c}.", "The local time in {c} is {t}."]).format(t=tm, c=city)
    elif name == "add_todo":
        task = p.choice(p.tasks)
        due = r.choice([None, None, r.choice(DAYS)])
        by = "" if due is None else (f" for {due}" if due in ("tomorrow", "today") else f" for {due}")
        user = r.choice(["Add {k} to my to-do list{b}.", "Put {k} on my todo list{b}.", "New task: {k}{b}",
                         "Add a task to {k}{b}.", "Remind me to {k}{b}.", "Add \"{k}\" to my list{b}."])
        user = user.format(k=task, b=by)
        args = {"task": task} | ({"due": due} if due else {})
        result = {"status": "added", "task": task}
        answer = r.choice(["I added {k} to your to-do list{b}.", "Added: {k}{b}."]).format(k=task, b=by)
    elif name == "get_stock_price":
        sym = p.choice(p.symbols)
        if follow_up:
            user = r.choice(["And {s}?", "What about {s}?", "Now {s}."]).format(s=sym)
        else:
            user = r.choice(["What's the price of {s}?", "How is {s} trading?", "Stock price for {s}?",
                             "What is {s} at right now?", "Check the {s} stock price.", "{s} price please"]).format(s=sym)
        args = {"symbol": sym}
        price = round(r.uniform(5, 900), 2)
        result = {"symbol": sym, "price": price, "currency": "USD"}
        answer = r.choice(["{s} is trading at {p} USD.", "{s} is at {p} USD right now."]).format(s=sym, p=price)
    else:
        raise KeyError(name)
    return user, args, result, answer


# ----------------------------------------------------------------------------------------------
# Chat exchanges (no tool).
PY_ONE = [  # (description of what it returns, body with {p})
    ("the square of {p}", "{p} * {p}"), ("the cube of {p}", "{p} ** 3"), ("double {p}", "2 * {p}"),
    ("half of {p}", "{p} / 2"), ("{p} plus one", "{p} + 1"), ("the absolute value of {p}", "abs({p})"),
    ("whether {p} is even", "{p} % 2 == 0"), ("whether {p} is odd", "{p} % 2 == 1"),
    ("the negative of {p}", "-{p}"), ("{p} squared plus one", "{p} * {p} + 1"),
]
PY_SEQ = [  # on a list or string
    ("the sum of a list", "items", "sum({p})"), ("the length of a list", "items", "len({p})"),
    ("the largest number in a list", "numbers", "max({p})"), ("the smallest number in a list", "numbers", "min({p})"),
    ("a string reversed", "s", "{p}[::-1]"), ("a string in upper case", "s", "{p}.upper()"),
    ("a string in lower case", "s", "{p}.lower()"), ("the number of words in a string", "text", "len({p}.split())"),
    ("the first element of a list", "items", "{p}[0]"), ("the last element of a list", "items", "{p}[-1]"),
    ("a sorted copy of a list", "items", "sorted({p})"), ("the average of a list", "numbers", "sum({p}) / len({p})"),
]
PY_TWO = [  # (phrase, default name, expression)
    ("adds two numbers", "add", "a + b"), ("subtracts two numbers", "subtract", "a - b"),
    ("multiplies two numbers", "multiply", "a * b"), ("divides two numbers", "divide", "a / b"),
    ("returns the larger of two numbers", "maximum", "max(a, b)"),
    ("returns the smaller of two numbers", "minimum", "min(a, b)"),
    ("returns the average of two numbers", "average", "(a + b) / 2"),
]


def _fn_name(r: random.Random) -> str:
    return f"{r.choice(FN_VERBS)}_{r.choice(FN_NOUNS)}" if r.random() < 0.8 else r.choice(["f", "g", "fn", "helper"])


def python_exchange(p: Pools) -> tuple[str, str]:
    r = p.rng
    write = r.choice(["Write a Python function", "Write a function in Python", "Can you write a Python function",
                      "Please write a Python function", "Give me a Python function", "Python: write a function"])
    kind = r.random()
    if kind < 0.35:
        phrase, default, expr = r.choice(PY_TWO)
        name = _fn_name(r) if r.random() < 0.5 else default
        named = f" named {name}" if name != default or r.random() < 0.3 else ""
        user = f"{write}{named} that {phrase}."
        code = f"def {name}(a, b):\n    return {expr}"
    elif kind < 0.75:
        what, body = r.choice(PY_ONE)
        prm = r.choice(["x", "x", "n", "value", "num"])
        name = _fn_name(r)
        user = f"{write} named {name} that returns {what.format(p=prm)}."
        code = f"def {name}({prm}):\n    return {body.format(p=prm)}"
    else:
        what, prm, body = r.choice(PY_SEQ)
        name = _fn_name(r)
        user = f"{write} named {name} that returns {what}."
        code = f"def {name}({prm}):\n    return {body.format(p=prm)}"
    if r.random() < 0.3:
        user = user.rstrip(".?") + "?" if user.startswith("Can") else user
    lead = r.choice(["", "Here it is:\n\n", "Sure:\n\n", "Here is the function:\n\n"])
    return user, f"{lead}```python\n{code}\n```"


def chat_exchange(p: Pools, kind: str, state: dict) -> tuple[str, str]:
    r = p.rng
    if kind == "greet":
        g = r.choice(["Hi", "Hello!", "Hey", "Hi there!", "Hello", "hey there", "Good morning", "Good evening!",
                      "Hello, how are you?", "Hi, how are you doing?", "Yo", "Greetings"])
        if "how are you" in g:
            return g, r.choice(["I'm doing well, thanks for asking! How can I help you today?",
                                "I'm great, thank you! What can I do for you?"])
        if g.startswith("Good"):
            return g, f"{g.rstrip('!')}! How can I help you today?"
        return g, r.choice(["Hello! How can I help you today?", "Hi! What can I do for you?",
                            "Hey! How can I help?", "Hello! What would you like to do?"])
    if kind == "intro":
        n = p.choice(p.names)
        state["user_name"] = n
        u = r.choice(["Hi, I'm {n}.", "Hello! My name is {n}.", "Hey, I am {n}", "I'm {n}, nice to meet you."])
        return u.format(n=n), r.choice(["Nice to meet you, {n}! How can I help you today?",
                                        "Hello {n}! What can I do for you?"]).format(n=n)
    if kind == "recall":
        u = r.choice(["What's my name?", "Do you remember my name?", "Who am I?", "What is my name?"])
        return u, r.choice(["Your name is {n}.", "You are {n}."]).format(n=state["user_name"])
    if kind == "name":
        u = r.choice(["What is your name?", "Who are you?", "What's your name?", "What should I call you?"])
        if "assistant_name" in state:
            return u, r.choice(["My name is {a}.", "I am {a}, your assistant.", "You can call me {a}."]).format(
                a=state["assistant_name"])
        return u, r.choice(["I am a small demo assistant, a 3.5M-parameter model made with aot.",
                            "I'm aot's tiny demo assistant."])
    if kind == "can":
        u = r.choice(["What can you do?", "What are you able to do?", "How can you help me?", "What are your skills?",
                      "help", "What can you help with?"])
        tools = state.get("tools")
        if tools:
            tool_list = _and([t["function"]["name"] for t in tools])
            return u, f"I can chat, write short Python functions, and call the tools you gave me: {tool_list}."
        return u, r.choice(["I can chat, write short Python functions, and call tools that you give me, "
                            "such as checking the weather or setting a timer.",
                            "I am a tiny model: I can say hello, write small Python functions, and call tools "
                            "like get_weather or set_timer when you provide them."])
    if kind == "thanks":
        u = r.choice(["Thanks!", "Thank you", "thanks a lot", "Great, thanks.", "Perfect, thank you!", "Cool, thanks"])
        return u, r.choice(["You're welcome!", "Happy to help!", "Anytime!", "You're welcome! Anything else?"])
    if kind == "bye":
        u = r.choice(["Bye", "Goodbye!", "See you later", "That's all, bye!", "Good night"])
        return u, r.choice(["Goodbye! Have a great day.", "Bye! Talk to you soon.", "See you!"])
    if kind == "python":
        return python_exchange(p)
    raise KeyError(kind)


SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant.", "You are a friendly assistant.",
           "You are a helpful assistant. Answer briefly.", "Be helpful and brief."]


def date_string(r: random.Random) -> str:
    return f"{r.randint(1, 28):02d} {r.choice(MONTHS)} {r.randint(2023, 2027)}"


def offered_tools(r: random.Random) -> list[dict]:
    """2-4 tools (mostly 2-3: each schema costs 110-190 tokens of prompt) in random order."""
    return [TOOLS[n] for n in r.sample(list(TOOLS), r.choices([2, 3, 4], weights=[45, 35, 20])[0])]


def tool_call_message(name: str, args: dict) -> dict:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}


def tool_result_message(r: random.Random, result: dict) -> dict:
    # The template renders a mapping as JSON, and a string through tojson (a quoted JSON string); train on both.
    return {"role": r.choice(["tool", "tool", "ipython"]),
            "content": result if r.random() < 0.7 else json.dumps(result)}


def conversation(p: Pools, force: str | None = None) -> dict:
    """One conversation: {"messages", "tools", "date", "kind"}; force="tool_call" ends at a tool call."""
    r = p.rng
    state: dict = {}
    messages: list[dict] = []
    if force == "tool_call":
        kind = "tool_call"
    else:
        kind = r.choices(["chat", "tool", "multi"], weights=[20, 35, 45])[0]
    use_tools = kind in ("tool", "tool_call") or (kind == "multi" and r.random() < 0.8) or \
        (kind == "chat" and r.random() < 0.25)
    tools = None
    if use_tools:
        tools = offered_tools(r)
        state["tools"] = tools
    sys_roll = r.random()
    if sys_roll < 0.25:
        a = p.choice(p.assistant_names)
        state["assistant_name"] = a
        messages.append({"role": "system", "content": r.choice([
            f"You are {a}, a friendly assistant.", f"Your name is {a}. You are a helpful assistant.",
            f"You are {a}, a helpful assistant. Be brief."])})
    elif sys_roll < 0.5:
        messages.append({"role": "system", "content": r.choice(SYSTEMS)})

    def add_tool_exchange(name: str, with_result: bool, follow_up: bool = False):
        user, args, result, answer = tool_request(p, name, follow_up)
        messages.append({"role": "user", "content": user})
        messages.append(tool_call_message(name, args))
        if with_result:
            messages.append(tool_result_message(r, result))
            messages.append({"role": "assistant", "content": answer})
        return name, args

    def add_chat(k: str):
        u, a = chat_exchange(p, k, state)
        messages.append({"role": "user", "content": u})
        messages.append({"role": "assistant", "content": a})

    expected = None
    if kind == "tool_call":
        name = r.choice([t["function"]["name"] for t in tools])
        expected = add_tool_exchange(name, with_result=False)
    elif kind == "tool":
        tool_names = [t["function"]["name"] for t in tools]
        name = r.choice(tool_names)
        more = r.random() < 0.5
        add_tool_exchange(name, with_result=more or r.random() < 0.6)
        if more:
            add_tool_exchange(r.choice(tool_names), with_result=r.random() < 0.6)
    elif kind == "chat":
        k = r.choices(["greet", "can", "python", "name", "intro", "thanks", "bye"],
                      weights=[25, 15, 35, 10 if "assistant_name" not in state else 30, 8, 4, 3])[0]
        add_chat(k)
    else:  # multi: 2-3 exchanges
        n = r.choice([2, 2, 3])
        steps: list[str] = []
        tool_names = [t["function"]["name"] for t in tools] if tools else []
        for i in range(n):
            options = ["greet", "can", "python", "name", "intro"] if i == 0 else ["python", "thanks", "can", "name"]
            if "user_name" in state:
                options += ["recall", "recall"]
            if tools:
                options += ["tool", "tool", "tool"]
                if steps and steps[-1].startswith("tool:"):
                    options += ["follow", "follow", "thanks"]
            if i == n - 1 and i > 0:
                options += ["bye"]
            k = r.choice(options)
            last = i == n - 1
            if k == "tool":
                name = r.choice(tool_names)
                add_tool_exchange(name, with_result=not last or r.random() < 0.6)
                steps.append(f"tool:{name}")
            elif k == "follow":
                name = steps[-1].split(":", 1)[1]
                fu = name in ("get_weather", "send_message", "set_timer", "get_time", "get_stock_price")
                add_tool_exchange(name, with_result=not last or r.random() < 0.6, follow_up=fu)
                steps.append(f"tool:{name}")
            else:
                add_chat(k)
                steps.append(k)
    return {"messages": messages, "tools": tools, "date": date_string(r), "kind": kind, "expected": expected}


# ----------------------------------------------------------------------------------------------
# Rendering and tokenising.
def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    assert tok.get_vocab_size() == 2048
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in NEW_SPECIAL])
    ids = [tok.token_to_id(s) for s in NEW_SPECIAL]
    assert ids == list(range(2048, 2056)), ids
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOT_TOKEN)
    hf.chat_template = TEMPLATE.read_text()
    return hf


def render(tok, conv: dict, add_generation_prompt: bool = False, messages: list | None = None) -> str:
    kw = {"tools": conv["tools"]} if conv["tools"] else {}
    return tok.apply_chat_template(messages if messages is not None else conv["messages"], tokenize=False,
                                   date_string=conv["date"], add_generation_prompt=add_generation_prompt, **kw)


def encode_training(tok, text: str, r: random.Random) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE outside assistant turns). The text before each assistant turn's content
    is tokenised on its own, as a prompt ending in the assistant header is at inference, so the turn is
    learned exactly as it is generated. Earlier turns are sometimes tokenised together with their header
    instead (as a runner that re-tokenises the whole history would see them); the last turn never."""
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    spans = []
    while (i := text.find(ASSISTANT_HEADER, pos)) >= 0:
        j = i + len(ASSISTANT_HEADER)
        k = text.index(EOT_TOKEN, j) + len(EOT_TOKEN)
        spans.append((pos, j, k))
        pos = k
    for n, (a, j, k) in enumerate(spans):
        if n < len(spans) - 1 and r.random() < 0.3:
            e = tok(text[a:k], add_special_tokens=False, return_offsets_mapping=True)
            for t, (s, _) in zip(e.input_ids, e.offset_mapping):
                ids.append(t)
                labels.append(t if s >= j - a else IGNORE)
        else:
            pre, ans = enc(text[a:j]), enc(text[j:k])
            ids += pre + ans
            labels += [IGNORE] * len(pre) + ans
    rest = enc(text[pos:]) if pos < len(text) else []
    ids += rest
    labels += [IGNORE] * len(rest)
    return ids, labels


def make_dataset(tok, seed: int, n: int, max_len: int, prompts: set | None = None):
    """n conversations as (ids, labels); `prompts` collects each one's prompt up to its first tool call."""
    r = random.Random(seed)
    p = Pools(r)
    data = []
    while len(data) < n:
        conv = conversation(p)
        ids, labels = encode_training(tok, render(tok, conv), r)
        if len(ids) <= max_len:
            data.append((ids, labels))
            k = next((i for i, m in enumerate(conv["messages"]) if "tool_calls" in m), None)
            if prompts is not None and k is not None:
                prompts.add(render(tok, conv, add_generation_prompt=True, messages=conv["messages"][:k]))
    return data


def batches(data, tokens_per_batch: int, r: random.Random):
    """Length-bucketed batches of about tokens_per_batch padded tokens, in random order."""
    order = sorted(range(len(data)), key=lambda i: (len(data[i][0]), r.random()))
    out, cur, longest = [], [], 0
    for i in order:
        L = len(data[i][0])
        if cur and max(longest, L) * (len(cur) + 1) > tokens_per_batch:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, L)
    if cur:
        out.append(cur)
    r.shuffle(out)
    return out


def collate(data, idx: list[int]):
    L = max(len(data[i][0]) for i in idx)
    x = torch.full((len(idx), L), EOS, dtype=torch.long)
    y = torch.full((len(idx), L), IGNORE, dtype=torch.long)
    m = torch.zeros((len(idx), L), dtype=torch.long)
    for b, i in enumerate(idx):
        ids, labels = data[i]
        x[b, : len(ids)] = torch.tensor(ids)
        y[b, : len(ids)] = torch.tensor(labels)
        m[b, : len(ids)] = 1
    return x, y, m


def loss_of(model, x, y, m):
    # Right padding under causal attention changes no real token's output, so no mask is needed (and
    # leaving it out keeps scaled_dot_product_attention on its fast causal path); m is kept for clarity.
    logits = model(input_ids=x).logits[:, :-1]
    tgt = y[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum"), (tgt != IGNORE).sum()


@torch.no_grad()
def mean_loss(model, data, tokens_per_batch: int) -> float:
    total, count = 0.0, 0
    for idx in batches(data, tokens_per_batch, random.Random(0)):
        s, c = loss_of(model, *collate(data, idx))
        total, count = total + s.item(), count + c.item()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# Evaluation by greedy decoding.
@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 80) -> str:
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=[EOT, EOS, EOM], pad_token_id=EOS)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def parse_call(text: str):
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def eval_tool_calls(model, tok, seed: int, n: int, unseen: bool, seen_prompts: set[str]):
    r = random.Random(seed)
    p = Pools(r, unseen=unseen)
    results = []
    for _ in range(n):
        conv = conversation(p, force="tool_call")
        name, args = conv["expected"]
        prompt = render(tok, conv, add_generation_prompt=True, messages=conv["messages"][:-1])
        want = render(tok, conv)[len(prompt):].removesuffix(EOT_TOKEN)
        got = generate(model, tok, prompt, 64)
        obj = parse_call(got)
        ok = bool(obj) and obj.get("name") == name and obj.get("parameters") == args
        results.append({"user": conv["messages"][-2]["content"], "tools": [t["function"]["name"] for t in conv["tools"]],
                        "expected": want, "got": got, "exact_match": ok, "string_match": got.strip() == want,
                        "json": obj is not None, "right_name": bool(obj) and obj.get("name") == name,
                        "prompt_in_training": prompt in seen_prompts})
    return results


def eval_answers(model, tok, seed: int, n: int):
    """After a tool result: does the final answer match the one the generator would write (exactly)?"""
    r = random.Random(seed)
    p = Pools(r)
    rows = []
    for _ in range(n):
        tools = offered_tools(r)
        name = r.choice([t["function"]["name"] for t in tools])
        user, args, result, answer = tool_request(p, name)
        conv = {"tools": tools, "date": date_string(r), "messages": [
            {"role": "user", "content": user}, tool_call_message(name, args), {"role": "tool", "content": result}]}
        prompt = render(tok, conv, add_generation_prompt=True)
        got = generate(model, tok, prompt, 48).strip()
        values = [str(v) for v in result.values() if isinstance(v, (str, int, float)) and k_relevant(v)]
        rows.append({"user": user, "result": result, "got": got,
                     "values_copied": all(v in got for v in values) if values else None})
    return rows


def k_relevant(v) -> bool:
    return not (isinstance(v, str) and (v.startswith("evt_") or v in ("created", "sent", "running", "added", "USD")))


CHAT_PROBES = [
    (None, None, [{"role": "user", "content": "Hi"}]),
    (None, None, [{"role": "user", "content": "Hello!"}]),
    (None, None, [{"role": "user", "content": "What can you do?"}]),
    (None, None, [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Write a Python function that adds two numbers."}]),
    (None, None, [{"role": "user", "content": "Write a Python function named square_it that returns the square of x."}]),
    (None, None, [{"role": "user", "content": "Write a Python function named rev that returns a string reversed."}]),
    (None, None, [{"role": "system", "content": "You are Pip, a friendly assistant."},
                  {"role": "user", "content": "What is your name?"}]),
    (None, None, [{"role": "user", "content": "Hi, I'm Alice."}, {"role": "assistant", "content": "Nice to meet you, Alice! How can I help you today?"},
                  {"role": "user", "content": "What's my name?"}]),
    (["get_weather", "set_timer", "send_message"], None, [{"role": "user", "content": "What's the weather in Paris?"}]),
    (["get_weather", "set_timer", "send_message"], None, [{"role": "user", "content": "Set a timer for 7 minutes."}]),
    (["get_weather", "send_message"], None, [{"role": "user", "content": "Send a message to Bob saying I'm on my way."}]),
    (["create_event", "add_todo", "get_time"], None, [{"role": "user", "content": "Schedule Team lunch on Friday at 12:30 with Anna and Ben."}]),
    (["get_weather", "set_timer"], None, [
        {"role": "user", "content": "What's the weather in Paris?"},
        tool_call_message("get_weather", {"city": "Paris"}),
        {"role": "tool", "content": {"city": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}}]),
    (["get_weather", "set_timer"], None, [
        {"role": "user", "content": "What's the weather in Paris?"},
        tool_call_message("get_weather", {"city": "Paris"}),
        {"role": "tool", "content": {"city": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}},
        {"role": "assistant", "content": "It is 18 degrees Celsius and sunny in Paris."},
        {"role": "user", "content": "And in Rome?"}]),
    (["get_weather", "set_timer"], None, [{"role": "user", "content": "Hi"}]),
]


def chat_probes(model, tok):
    rows = []
    for names, _, messages in CHAT_PROBES:
        conv = {"tools": [TOOLS[n] for n in names] if names else None, "date": "02 Dec 2025", "messages": messages}
        prompt = render(tok, conv, add_generation_prompt=True)
        rows.append({"tools": names, "messages": messages, "reply": generate(model, tok, prompt, 80)})
    return rows


# ----------------------------------------------------------------------------------------------
README = """# aot demo instruct model

A **3.5M-parameter toy**: aot's embedded demo model (`aot/demo/model`, a Llama 3.2-architecture model
trained on the Python standard library's source by `tools/train_demo.py`) fine-tuned on synthetic chat
and tool-calling conversations, so that `aot run --chat` and a JSON tool call can be seen working on a
fresh clone without downloading anything. It is not a useful assistant: it knows a few dozen kinds of
exchanges, and outside them it produces fluent-looking nonsense.

Made by `{command}` in {minutes:.0f} minutes on {cpus} CPU cores (seed {seed}, {steps} steps, about
{tokens_m:.1f}M tokens, loss on assistant tokens only); the figures are in `training.json`.

## Format

- Hugging Face layout: `config.json` (LlamaForCausalLM, vocab 2056, tied embeddings, llama3 rope scaling),
  `model.safetensors` (bf16), `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
- Tokenizer: the base demo's byte-level BPE (ids 0-2047 unchanged: `<|begin_of_text|>` 0,
  `<|end_of_text|>` 1, `<|eot_id|>` 2) plus Llama 3's other chat special tokens as added special tokens:
  `<|start_header_id|>` 2048, `<|end_header_id|>` 2049, `<|eom_id|>` 2050, `<|python_tag|>` 2051,
  `<|reserved_special_token_0|>`..`3|>` 2052-2055. Their embedding rows started as the mean of the
  existing rows plus small noise.
- `tokenizer_config.json` carries the Llama 3.2 Instruct chat template (`aot/chat_templates/llama3.2.jinja`,
  with JSON tool calling: tools go into the first user message, a call is
  `{{"name": ..., "parameters": {{...}}}}<|eot_id|>`, a result is an `ipython` turn). Stop ids:
  `<|eot_id|>` 2, `<|end_of_text|>` 1, `<|eom_id|>` 2050.

## Training data (synthetic, seeded, generated by the script)

- Chat, with and without a system message: greetings, "What can you do?", "What is your name?" (answered
  from the system message when it names the assistant), "Hi, I'm X" / "What's my name?", thanks, bye,
  and short Python functions ("Write a Python function named X that returns the square of x": 29 shapes,
  names and parameter names copied from the request).
- Tool calls: 2-4 tools offered out of 9 OpenAI-style schemas (get_weather, create_event, send_message,
  set_timer, search_notes, convert_currency, get_time, add_todo, get_stock_price); the user asks for one,
  the assistant answers with the call, argument values copied from the request; in some conversations the
  tool's JSON result follows (as a mapping or as a JSON string) and a final answer in words copies its values.
- Multi-turn: 2-3 exchanges, with follow-ups ("And in Rome?") that need the earlier turns.
- Dates (`date_string`) vary; a quarter of the pure chat conversations also carry tools and should not call one.

## What it gets right (held-out, greedy decoding, see `training.json`)

- Tool-call exact match (JSON parses, right name, right arguments) on {n_calls} held-out tool-call prompts:
  **{tool_em}**; with city/name/title/... values never seen in training: **{tool_em_unseen}**.
- Final answers after a tool result that contain every value of the result: **{answer_copy}**.
- Held-out loss on assistant tokens: {heldout_loss:.3f} (base model before fine-tuning: {base_loss:.3f}).

Sample replies:

{samples}

## What it does not do

Anything outside the patterns above: it has no knowledge, cannot do arithmetic, does not follow arbitrary
instructions, and can call a tool with a wrongly copied value (see the misses in `training.json`). It only
ever makes one tool call per turn, as the template allows.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=1536)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-calls", type=int, default=50, help="held-out tool-call prompts to decode")
    p.add_argument("--eval-unseen", type=int, default=30, help="... with values never seen in training")
    p.add_argument("--eval-answers", type=int, default=20, help="... final answers after a tool result")
    p.add_argument("--heldout", type=int, default=200, help="held-out conversations for the loss")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    args = p.parse_args()

    import tokenizers
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tok = build_tokenizer()

    # Data: fresh conversations for training, held-out ones from another seed.
    est_per_conv = 520  # padded tokens per conversation, measured; only sizes the pool generously
    n_train = int(args.steps * args.tokens_per_batch / est_per_conv * 1.15)
    seen_prompts: set[str] = set()
    train = make_dataset(tok, args.seed, n_train, args.max_len, seen_prompts)
    heldout = make_dataset(tok, args.seed + 1_000_003, args.heldout, args.max_len)
    r = random.Random(args.seed)
    plan = []
    while len(plan) < args.steps:
        plan += batches(train, args.tokens_per_batch, r)
    epochs = len(plan) / len(batches(train, args.tokens_per_batch, random.Random(0)))
    plan = plan[: args.steps]
    n_tokens = sum(len(train[i][0]) for b in plan for i in b)
    n_labels = sum(sum(t != IGNORE for t in train[i][1]) for b in plan for i in b)
    data_seconds = time.time() - t0
    print(f"{len(train)} train conversations (mean {sum(len(d[0]) for d in train) / len(train):.0f} tokens), "
          f"{len(heldout)} held-out; {args.steps} steps, {epochs:.2f} epochs, {n_tokens:,} tokens "
          f"({n_labels:,} trained on); data {data_seconds:.0f}s", flush=True)

    # Model: the base demo weights, embeddings grown to 2056 rows (mean of the old rows plus noise).
    model = LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    base_heldout = mean_loss_on_new_vocab(model, heldout, args.tokens_per_batch)
    old = model.get_input_embeddings().weight.data
    gen = torch.Generator().manual_seed(args.seed)
    extra = old.mean(0, keepdim=True) + 0.02 * old.std() * torch.randn(len(NEW_SPECIAL), old.shape[1], generator=gen)
    model.resize_token_embeddings(2056, mean_resizing=False)
    model.get_input_embeddings().weight.data[2048:] = extra
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.config.vocab_size = 2056
    model.config.eos_token_id = [EOT, EOS, EOM]
    model.config.bos_token_id = BOS
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=[EOT, EOS, EOM])
    print(f"base model held-out loss {base_heldout:.3f}", flush=True)

    opt, sched = adamw_cosine(model, args.lr, args.steps, weight_decay=0.05, floor=0.05)
    train_t0, recent, curve = time.time(), [], []
    model.train()
    for step, idx in enumerate(plan, 1):
        x, y, m = collate(train, idx)
        s, c = loss_of(model, x, y, m)
        loss = s / c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 50 == 0 or step == args.steps:
            el = time.time() - train_t0
            avg = sum(recent) / len(recent)
            curve.append({"step": step, "train_loss": round(avg, 4), "seconds": round(el, 1)})
            print(f"step {step:5d}  train loss {avg:.3f}  {el:.0f}s  "
                  f"{sum(len(train[i][0]) for b in plan[:step] for i in b) / el:,.0f} tok/s", flush=True)
    train_seconds = time.time() - train_t0

    model.eval()
    eval_t0 = time.time()
    model.to(torch.bfloat16)
    model.float()  # evaluate what ships: the bf16-rounded weights
    heldout_loss = mean_loss(model, heldout, args.tokens_per_batch)
    print(f"held-out loss {heldout_loss:.3f} (bf16 weights)", flush=True)

    calls = eval_tool_calls(model, tok, args.seed + 2_000_003, args.eval_calls, False, seen_prompts)
    calls_unseen = eval_tool_calls(model, tok, args.seed + 3_000_003, args.eval_unseen, True, seen_prompts)
    answers = eval_answers(model, tok, args.seed + 4_000_003, args.eval_answers)
    probes = chat_probes(model, tok)
    eval_seconds = time.time() - eval_t0
    em = sum(c["exact_match"] for c in calls)
    em_u = sum(c["exact_match"] for c in calls_unseen)
    copied = [a["values_copied"] for a in answers if a["values_copied"] is not None]
    for c in calls + calls_unseen:
        if not c["exact_match"]:
            print(f"MISS  {c['user']!r}\n  want {c['expected']}\n  got  {c['got']!r}")
    for pr in probes:
        print(f"PROBE {pr['messages'][-1]['content']!r} (tools {pr['tools']}) -> {pr['reply']!r}")
    print(f"tool-call exact match {em}/{len(calls)}; unseen values {em_u}/{len(calls_unseen)}; "
          f"answers copying the result {sum(copied)}/{len(copied)}", flush=True)

    model.to(torch.bfloat16)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    for extra_file in ("chat_template.jinja", "special_tokens_map.json"):
        if (out / extra_file).exists() and extra_file == "chat_template.jinja":
            # transformers 5 writes the template beside tokenizer_config.json; keep it inside it instead
            cfg = json.loads((out / "tokenizer_config.json").read_text())
            cfg["chat_template"] = TEMPLATE.read_text()
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
            (out / extra_file).unlink()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template") == TEMPLATE.read_text()

    record = {
        "command": "python tools/train_demo_instruct.py " + " ".join(sys.argv[1:]),
        "base": "aot/demo/model", "seed": args.seed, "steps": args.steps,
        "tokens_per_batch": args.tokens_per_batch, "lr": args.lr, "max_len": args.max_len,
        "train_conversations": len(train), "epochs": round(epochs, 3), "heldout_conversations": len(heldout),
        "tokens_seen": n_tokens, "assistant_tokens_trained": n_labels,
        "base_heldout_loss": round(base_heldout, 4),
        "final_train_loss": curve[-1]["train_loss"], "final_heldout_loss_bf16_weights": round(heldout_loss, 4), "loss_curve": curve,
        "tool_call_exact_match": f"{em}/{len(calls)}", "tool_call_exact_match_unseen_values": f"{em_u}/{len(calls_unseen)}",
        "tool_call_string_match": f"{sum(c['string_match'] for c in calls)}/{len(calls)}",
        "tool_call_valid_json": f"{sum(c['json'] for c in calls)}/{len(calls)}",
        "tool_call_right_name": f"{sum(c['right_name'] for c in calls)}/{len(calls)}",
        "heldout_tool_prompts_also_in_training": sum(c["prompt_in_training"] for c in calls + calls_unseen),
        "answers_copying_result_values": f"{sum(copied)}/{len(copied)}",
        "tool_call_misses": [c for c in calls + calls_unseen if not c["exact_match"]],
        "answer_samples": answers[:8], "chat_probes": probes,
        "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1), "total_seconds": round(time.time() - t0, 1),
        "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "evaluation": "greedy decoding with transformers' generate on the bf16-rounded weights; exact match = the "
                      "reply parses as JSON with the expected name and parameters; held-out prompts come from "
                      "other seeds; 'unseen values' prompts draw cities, names, titles, messages, tasks, queries "
                      f"and symbols only from the 1-in-{HOLDOUT_EVERY} share never used in training",
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    write_tools(out)
    samples = []
    for pr in probes:
        last = pr["messages"][-1]
        said = last["content"] if isinstance(last["content"], str) else json.dumps(last["content"])
        who = "tool result" if last["role"] == "tool" else "user"
        tools = f" (tools: {', '.join(pr['tools'])})" if pr["tools"] else ""
        samples.append(f"- {who}{tools}: `{said}`\n  -> `{pr['reply'].strip()}`".replace("\n```", " ```")
                       .replace("```\n", "``` "))
    (out / "README.md").write_text(README.format(
        command=record["command"], minutes=record["total_seconds"] / 60, cpus=args.threads, seed=args.seed,
        steps=args.steps, tokens_m=n_tokens / 1e6, n_calls=len(calls), tool_em=record["tool_call_exact_match"],
        tool_em_unseen=record["tool_call_exact_match_unseen_values"], answer_copy=record["answers_copying_result_values"],
        heldout_loss=heldout_loss, base_loss=base_heldout, samples="\n".join(samples)))
    print(json.dumps({k: v for k, v in record.items() if k not in ("tool_call_misses", "answer_samples",
                                                                    "chat_probes", "loss_curve")}, indent=2))


def write_tools(out: Path) -> None:
    """tools.json: the nine function schemas the model was trained to call (OpenAI format), for
    `aot run --tools` and the README's demo; every file readable by all (save_pretrained writes
    model.safetensors 0600)."""
    (out / "tools.json").write_text(json.dumps(list(TOOLS.values()), indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)


def mean_loss_on_new_vocab(model, data, tokens_per_batch: int) -> float:
    """The base model's held-out loss before fine-tuning; the new special ids (>= 2048) it has no rows for
    are mapped to <|eot_id|> for this one measurement."""
    mapped = [([t if t < 2048 else EOT for t in ids], [t if t < 2048 else (EOT if t != IGNORE else t) for t in lab])
              for ids, lab in data]
    return mean_loss(model, mapped, tokens_per_batch)


if __name__ == "__main__":
    main()
