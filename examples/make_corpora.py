"""Build the template-based training text of the example corpora (examples/*/train.txt).

    python examples/make_corpora.py            # rewrite examples/source/train.txt and examples/target/train.txt
    python examples/make_corpora.py --check    # verify the committed files are what this script makes
    python examples/make_corpora.py --vocabulary whisper-tiny.en/tokenizer.json   # rewrite source/vocabulary.txt

Both training sets come from templates filled from word lists with a fixed seed, so they are
reproducible and varied but formulaic. The test sets (examples/*/test.txt) are NOT generated:
they were written one sentence at a time, and the target test set puts the domain words into
sentence structures these templates never produce (`--check` also verifies that no test sentence
occurs in a training set and that every target test sentence uses a domain word from the lists
below). An adaptation is judged on those test sets.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

SEED = 0
N_SOURCE = 3200
N_TARGET = 1600
N_LEXICON = 4000
HERE = Path(__file__).resolve().parent

# --- source domain: everyday English ---------------------------------------------------------------------------

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Isla",
    "Jack",
    "Kemal",
    "Laura",
    "Marco",
    "Nina",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yusuf",
    "Zoe",
    "Alice",
    "Brian",
    "Chloe",
    "Daniel",
    "Elena",
    "Felix",
    "Hannah",
    "Ivan",
    "Julia",
    "Kevin",
    "Lucy",
    "Martin",
    "Olivia",
    "Peter",
    "Rachel",
    "Simon",
    "Tom",
    "Ursula",
    "Victor",
    "Wendy",
    "Amir",
    "Beth",
    "Colin",
    "Diana",
    "Ethan",
]
RELATIVES = [
    "my sister",
    "my brother",
    "our neighbour",
    "my grandmother",
    "my uncle",
    "her cousin",
    "his father",
    "my aunt",
    "our landlord",
    "my flatmate",
    "their daughter",
    "my best friend",
    "the new colleague",
    "my mother",
    "his wife",
    "her husband",
    "our son",
    "the older kids",
    "my grandfather",
    "the twins",
]
PLACES = [
    "the library",
    "the bakery",
    "the train station",
    "the park",
    "the supermarket",
    "the post office",
    "the swimming pool",
    "the market",
    "the museum",
    "the cinema",
    "the bank",
    "the beach",
    "the garden centre",
    "the hardware shop",
    "the bus stop",
    "the town hall",
    "the football ground",
    "the café on the corner",
    "the bookshop",
    "the farmers market",
    "the petrol station",
    "the airport",
    "the gym",
    "the harbour",
]
CITIES = [
    "Lisbon",
    "Toronto",
    "Manchester",
    "Dublin",
    "Edinburgh",
    "Sydney",
    "Chicago",
    "Vienna",
    "Oslo",
    "Madrid",
    "Prague",
    "Boston",
    "Glasgow",
    "Seattle",
    "Amsterdam",
    "Copenhagen",
    "Melbourne",
    "Denver",
    "Bristol",
    "Vancouver",
    "Naples",
    "Krakow",
    "Montreal",
    "Wellington",
]
WHEN = [
    "on Monday",
    "on Tuesday morning",
    "on Wednesday",
    "last Thursday",
    "on Friday evening",
    "on Saturday",
    "every Sunday",
    "yesterday",
    "this morning",
    "tonight",
    "after lunch",
    "before breakfast",
    "at the weekend",
    "next week",
    "in the afternoon",
    "last night",
    "at half past seven",
    "around noon",
    "early tomorrow",
    "after work",
    "during the holidays",
    "in the spring",
    "last summer",
    "at about six o'clock",
]
FOODS = [
    "a loaf of bread",
    "some fresh tomatoes",
    "a bag of apples",
    "two pints of milk",
    "a box of eggs",
    "some cheese",
    "a bunch of bananas",
    "a jar of honey",
    "some rice",
    "a pack of pasta",
    "a few onions",
    "a chicken",
    "some carrots",
    "a bottle of olive oil",
    "a bag of flour",
    "some strawberries",
    "a tin of beans",
    "a melon",
    "some coffee",
    "a packet of biscuits",
    "a pumpkin",
    "some potatoes",
]
DISHES = [
    "vegetable soup",
    "a lemon cake",
    "spaghetti with meatballs",
    "a mushroom risotto",
    "fish and chips",
    "a chicken curry",
    "pancakes",
    "a Greek salad",
    "roast potatoes",
    "an apple pie",
    "scrambled eggs",
    "a pot of chilli",
    "banana bread",
    "tomato sauce",
    "a shepherd's pie",
    "fried rice",
    "lentil stew",
]
OBJECTS = [
    "the keys",
    "my umbrella",
    "the remote control",
    "her phone",
    "the blue jacket",
    "his wallet",
    "the shopping list",
    "a pair of gloves",
    "the charger",
    "my glasses",
    "the ticket",
    "the map",
    "a spare battery",
    "the dog's lead",
    "the receipt",
    "the library card",
    "my notebook",
    "the torch",
]
ROOMS = [
    "the kitchen",
    "the hallway",
    "the spare bedroom",
    "the garage",
    "the attic",
    "the living room",
    "the bathroom",
    "the shed",
    "the basement",
    "the back garden",
    "the car",
    "the top drawer",
]
ACTIVITIES = [
    "play tennis",
    "go for a long walk",
    "visit the old castle",
    "paint the fence",
    "bake some bread",
    "learn the guitar",
    "clean the windows",
    "go fishing",
    "watch the football",
    "plant some roses",
    "fix the bicycle",
    "go to the theatre",
    "take the dog out",
    "tidy the garage",
    "read a good book",
    "go swimming",
    "try the new restaurant",
    "build a bookshelf",
    "go camping",
    "sort out the photos",
    "practise the piano",
    "ride along the canal",
    "do the crossword",
    "knit a scarf",
]
WEATHER = [
    "sunny",
    "cold",
    "windy",
    "rainy",
    "foggy",
    "warm",
    "freezing",
    "cloudy",
    "stormy",
    "mild",
    "humid",
    "bright",
]
ADJECTIVES = [
    "lovely",
    "busy",
    "quiet",
    "expensive",
    "crowded",
    "friendly",
    "boring",
    "wonderful",
    "noisy",
    "tiny",
    "enormous",
    "peaceful",
    "strange",
    "comfortable",
    "brilliant",
    "messy",
    "modern",
    "old",
]
JOBS = [
    "teacher",
    "plumber",
    "nurse",
    "bus driver",
    "electrician",
    "chef",
    "gardener",
    "carpenter",
    "librarian",
    "mechanic",
    "postman",
    "hairdresser",
    "accountant",
    "photographer",
    "firefighter",
    "farmer",
]
VEHICLES = ["the bus", "the train", "a taxi", "the ferry", "my bike", "the tram", "the car", "the night bus"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "fifteen", "twenty", "thirty"]
ANIMALS = [
    "the cat",
    "our dog",
    "a fox",
    "the neighbour's rabbit",
    "two ducks",
    "a robin",
    "the horse",
    "a squirrel",
    "the goldfish",
    "a hedgehog",
]

SOURCE_TEMPLATES = [
    "{name} went to {place} {when}.",
    "{name} and {relative} are going to {city} {when}.",
    "Could you pick up {food} on your way home?",
    "I left {object} in {room} {when}.",
    "It was really {weather} in {city} {when}.",
    "We should {activity} {when}.",
    "{relative} wants to {activity} {when}, if the weather stays {weather}.",
    "The {adj} {job} next door helped us move the sofa.",
    "{name} made {dish} for everyone {when}.",
    "Have you seen {object}? I think it is in {room}.",
    "My train to {city} was delayed by {number} minutes {when}.",
    "{place} was {adj} {when}, so we went home early.",
    "{name} is training to become a {job}.",
    "Don't forget to bring {object} when you go to {place}.",
    "We took {vehicle} to {place} because it was {weather}.",
    "{relative} has lived in {city} for {number} years.",
    "I need {food} and {food2} for {dish}.",
    "{animal} was sitting in {room} {when}.",
    "There were about {number} people waiting outside {place}.",
    "{name} asked {relative} to {activity} {when}.",
    "The flight from {city} to {city2} takes about {number} hours.",
    "If it is {weather} {when}, we will {activity} instead.",
    "{name} found {object} under the cushions in {room}.",
    "Our {adj} neighbour is a retired {job} from {city}.",
    "The recipe for {dish} needs {food}.",
    "{name} prefers to {activity} rather than {activity2}.",
    "Please tell {relative} that dinner is at {number} o'clock.",
    "We spent {number} pounds at {place} {when}.",
    "{name} called from {city} to say the weather there was {weather}.",
    "I usually {activity} with {relative} {when}.",
    "The {adj} café near {place} serves the best {dish} in town.",
    "{name} missed {vehicle} and had to walk to {place}.",
    "{relative} borrowed {object} and never gave it back.",
    "Is {place} open {when}?",
    "Why don't we {activity} {when}?",
    "{name} says {city} is {adj} but very {adj2}.",
    "After we {activity}, let's have {dish} for dinner.",
    "{animal} ran across the road in front of {vehicle}.",
    "{name} bought {food} at {place} {when}.",
    "The {job} said the repairs would take {number} days.",
    "{relative} and I are planning to {activity} in {city}.",
    "Someone left {object} on the seat of {vehicle}.",
    "It takes {number} minutes to walk from {place} to {place2}.",
    "{name} has been learning to {activity} for {number} weeks.",
    "We watched {animal} from the window of {room} {when}.",
]
SOURCE_SLOTS = {
    "name": NAMES,
    "relative": RELATIVES,
    "place": PLACES,
    "place2": PLACES,
    "city": CITIES,
    "city2": CITIES,
    "when": WHEN,
    "food": FOODS,
    "food2": FOODS,
    "dish": DISHES,
    "object": OBJECTS,
    "room": ROOMS,
    "activity": ACTIVITIES,
    "activity2": ACTIVITIES,
    "weather": WEATHER,
    "adj": ADJECTIVES,
    "adj2": ADJECTIVES,
    "job": JOBS,
    "vehicle": VEHICLES,
    "number": NUMBERS,
    "animal": ANIMALS,
}

# --- target domain: pharmacology ----------------------------------------------------------------------------------

# (drug, typical doses, usual frequency, route, conditions it treats)
DRUGS = [
    (
        "metoprolol",
        ["25 milligrams", "50 milligrams", "100 milligrams"],
        "twice daily",
        "by mouth",
        ["hypertension", "atrial fibrillation", "angina"],
    ),
    (
        "lisinopril",
        ["5 milligrams", "10 milligrams", "20 milligrams"],
        "once daily",
        "by mouth",
        ["hypertension", "heart failure"],
    ),
    (
        "atorvastatin",
        ["20 milligrams", "40 milligrams", "80 milligrams"],
        "at bedtime",
        "by mouth",
        ["hyperlipidemia", "coronary artery disease"],
    ),
    ("amlodipine", ["5 milligrams", "10 milligrams"], "once daily", "by mouth", ["hypertension", "angina"]),
    (
        "metformin",
        ["500 milligrams", "850 milligrams", "1000 milligrams"],
        "twice daily with meals",
        "by mouth",
        ["type 2 diabetes"],
    ),
    (
        "levothyroxine",
        ["25 micrograms", "50 micrograms", "75 micrograms", "100 micrograms"],
        "every morning before breakfast",
        "by mouth",
        ["hypothyroidism"],
    ),
    (
        "omeprazole",
        ["20 milligrams", "40 milligrams"],
        "once daily before breakfast",
        "by mouth",
        ["gastroesophageal reflux disease", "peptic ulcer disease"],
    ),
    (
        "pantoprazole",
        ["40 milligrams"],
        "once daily",
        "intravenously",
        ["gastroesophageal reflux disease", "upper gastrointestinal bleeding"],
    ),
    (
        "losartan",
        ["25 milligrams", "50 milligrams", "100 milligrams"],
        "once daily",
        "by mouth",
        ["hypertension", "diabetic nephropathy"],
    ),
    (
        "hydrochlorothiazide",
        ["12.5 milligrams", "25 milligrams"],
        "every morning",
        "by mouth",
        ["hypertension", "edema"],
    ),
    (
        "gabapentin",
        ["100 milligrams", "300 milligrams", "600 milligrams"],
        "three times a day",
        "by mouth",
        ["neuropathic pain", "postherpetic neuralgia"],
    ),
    (
        "sertraline",
        ["25 milligrams", "50 milligrams", "100 milligrams"],
        "once daily",
        "by mouth",
        ["major depressive disorder", "panic disorder"],
    ),
    (
        "escitalopram",
        ["5 milligrams", "10 milligrams", "20 milligrams"],
        "once daily",
        "by mouth",
        ["generalized anxiety disorder", "major depressive disorder"],
    ),
    (
        "bupropion",
        ["150 milligrams", "300 milligrams"],
        "every morning",
        "by mouth",
        ["major depressive disorder", "smoking cessation"],
    ),
    (
        "clopidogrel",
        ["75 milligrams"],
        "once daily",
        "by mouth",
        ["acute coronary syndrome", "peripheral artery disease"],
    ),
    (
        "warfarin",
        ["2 milligrams", "5 milligrams"],
        "every evening",
        "by mouth",
        ["atrial fibrillation", "deep vein thrombosis"],
    ),
    (
        "apixaban",
        ["2.5 milligrams", "5 milligrams"],
        "twice daily",
        "by mouth",
        ["atrial fibrillation", "pulmonary embolism"],
    ),
    (
        "rivaroxaban",
        ["15 milligrams", "20 milligrams"],
        "once daily with the evening meal",
        "by mouth",
        ["deep vein thrombosis", "atrial fibrillation"],
    ),
    (
        "furosemide",
        ["20 milligrams", "40 milligrams", "80 milligrams"],
        "twice daily",
        "intravenously",
        ["heart failure", "pulmonary edema"],
    ),
    (
        "spironolactone",
        ["25 milligrams", "50 milligrams"],
        "once daily",
        "by mouth",
        ["heart failure", "hyperaldosteronism"],
    ),
    (
        "carvedilol",
        ["3.125 milligrams", "6.25 milligrams", "12.5 milligrams"],
        "twice daily with food",
        "by mouth",
        ["heart failure", "hypertension"],
    ),
    (
        "prednisone",
        ["10 milligrams", "20 milligrams", "40 milligrams"],
        "every morning",
        "by mouth",
        ["asthma exacerbation", "rheumatoid arthritis"],
    ),
    ("montelukast", ["10 milligrams"], "every evening", "by mouth", ["asthma", "allergic rhinitis"]),
    (
        "albuterol",
        ["two puffs", "90 micrograms"],
        "every four hours as needed",
        "by inhaler",
        ["asthma", "bronchospasm"],
    ),
    ("tiotropium", ["18 micrograms"], "once daily", "by inhaler", ["chronic obstructive pulmonary disease"]),
    (
        "empagliflozin",
        ["10 milligrams", "25 milligrams"],
        "once daily",
        "by mouth",
        ["type 2 diabetes", "heart failure"],
    ),
    ("sitagliptin", ["50 milligrams", "100 milligrams"], "once daily", "by mouth", ["type 2 diabetes"]),
    (
        "semaglutide",
        ["0.25 milligrams", "0.5 milligrams", "1 milligram"],
        "once weekly",
        "subcutaneously",
        ["type 2 diabetes", "obesity"],
    ),
    (
        "insulin glargine",
        ["10 units", "20 units", "30 units"],
        "at bedtime",
        "subcutaneously",
        ["type 1 diabetes", "type 2 diabetes"],
    ),
    ("allopurinol", ["100 milligrams", "300 milligrams"], "once daily", "by mouth", ["gout", "hyperuricemia"]),
    ("colchicine", ["0.6 milligrams"], "twice daily", "by mouth", ["acute gout", "pericarditis"]),
    ("tamsulosin", ["0.4 milligrams"], "thirty minutes after dinner", "by mouth", ["benign prostatic hyperplasia"]),
    ("donepezil", ["5 milligrams", "10 milligrams"], "at bedtime", "by mouth", ["Alzheimer's disease"]),
    (
        "levetiracetam",
        ["500 milligrams", "1000 milligrams"],
        "twice daily",
        "intravenously",
        ["epilepsy", "focal seizures"],
    ),
    ("lamotrigine", ["25 milligrams", "100 milligrams"], "once daily", "by mouth", ["epilepsy", "bipolar disorder"]),
    (
        "quetiapine",
        ["25 milligrams", "100 milligrams", "300 milligrams"],
        "at bedtime",
        "by mouth",
        ["schizophrenia", "bipolar disorder"],
    ),
    (
        "aripiprazole",
        ["5 milligrams", "10 milligrams", "15 milligrams"],
        "once daily",
        "by mouth",
        ["schizophrenia", "bipolar disorder"],
    ),
    (
        "lorazepam",
        ["0.5 milligrams", "1 milligram", "2 milligrams"],
        "every six hours as needed",
        "intravenously",
        ["status epilepticus", "acute agitation"],
    ),
    ("zolpidem", ["5 milligrams", "10 milligrams"], "at bedtime as needed", "by mouth", ["insomnia"]),
    ("tramadol", ["50 milligrams", "100 milligrams"], "every six hours as needed", "by mouth", ["moderate pain"]),
    ("oxycodone", ["5 milligrams", "10 milligrams"], "every four hours as needed", "by mouth", ["severe pain"]),
    (
        "morphine",
        ["2 milligrams", "4 milligrams"],
        "every two hours as needed",
        "intravenously",
        ["severe pain", "acute myocardial infarction"],
    ),
    (
        "naloxone",
        ["0.4 milligrams", "2 milligrams"],
        "every three minutes as needed",
        "intravenously",
        ["opioid overdose"],
    ),
    ("buprenorphine", ["2 milligrams", "8 milligrams"], "once daily", "sublingually", ["opioid use disorder"]),
    (
        "ondansetron",
        ["4 milligrams", "8 milligrams"],
        "every eight hours as needed",
        "intravenously",
        ["nausea and vomiting"],
    ),
    ("metoclopramide", ["10 milligrams"], "before meals", "by mouth", ["gastroparesis", "nausea and vomiting"]),
    (
        "famotidine",
        ["20 milligrams"],
        "twice daily",
        "by mouth",
        ["peptic ulcer disease", "gastroesophageal reflux disease"],
    ),
    (
        "ceftriaxone",
        ["1 gram", "2 grams"],
        "once daily",
        "intravenously",
        ["community-acquired pneumonia", "bacterial meningitis"],
    ),
    (
        "amoxicillin",
        ["500 milligrams", "875 milligrams"],
        "three times a day",
        "by mouth",
        ["otitis media", "streptococcal pharyngitis"],
    ),
    (
        "azithromycin",
        ["250 milligrams", "500 milligrams"],
        "once daily",
        "by mouth",
        ["community-acquired pneumonia", "chlamydia"],
    ),
    ("doxycycline", ["100 milligrams"], "twice daily", "by mouth", ["Lyme disease", "acne"]),
    (
        "ciprofloxacin",
        ["250 milligrams", "500 milligrams"],
        "every twelve hours",
        "by mouth",
        ["urinary tract infection", "pyelonephritis"],
    ),
    (
        "vancomycin",
        ["1 gram", "1.5 grams"],
        "every twelve hours",
        "intravenously",
        ["MRSA bacteremia", "Clostridioides difficile infection"],
    ),
    (
        "piperacillin tazobactam",
        ["4.5 grams"],
        "every six hours",
        "intravenously",
        ["hospital-acquired pneumonia", "intra-abdominal infection"],
    ),
    ("nitrofurantoin", ["100 milligrams"], "twice daily", "by mouth", ["urinary tract infection"]),
    (
        "clindamycin",
        ["300 milligrams", "600 milligrams"],
        "every eight hours",
        "intravenously",
        ["cellulitis", "osteomyelitis"],
    ),
    (
        "metronidazole",
        ["500 milligrams"],
        "three times a day",
        "by mouth",
        ["bacterial vaginosis", "Clostridioides difficile infection"],
    ),
    (
        "fluconazole",
        ["150 milligrams", "400 milligrams"],
        "once daily",
        "by mouth",
        ["vaginal candidiasis", "cryptococcal meningitis"],
    ),
    (
        "valacyclovir",
        ["500 milligrams", "1 gram"],
        "three times a day",
        "by mouth",
        ["herpes zoster", "genital herpes"],
    ),
    ("oseltamivir", ["75 milligrams"], "twice daily", "by mouth", ["influenza"]),
    (
        "enoxaparin",
        ["40 milligrams", "1 milligram per kilogram"],
        "every twelve hours",
        "subcutaneously",
        ["deep vein thrombosis", "unstable angina"],
    ),
    ("heparin", ["5000 units"], "every eight hours", "subcutaneously", ["venous thromboembolism prophylaxis"]),
    (
        "digoxin",
        ["0.125 milligrams", "0.25 milligrams"],
        "once daily",
        "by mouth",
        ["atrial fibrillation", "heart failure"],
    ),
    (
        "amiodarone",
        ["200 milligrams", "400 milligrams"],
        "once daily",
        "by mouth",
        ["ventricular tachycardia", "atrial fibrillation"],
    ),
    (
        "diltiazem",
        ["30 milligrams", "120 milligrams"],
        "every six hours",
        "by mouth",
        ["atrial fibrillation", "angina"],
    ),
    (
        "hydralazine",
        ["10 milligrams", "25 milligrams"],
        "every six hours",
        "intravenously",
        ["hypertensive emergency", "preeclampsia"],
    ),
    ("nitroglycerin", ["0.4 milligrams"], "every five minutes as needed", "sublingually", ["angina"]),
    (
        "propranolol",
        ["10 milligrams", "40 milligrams"],
        "twice daily",
        "by mouth",
        ["migraine prophylaxis", "essential tremor"],
    ),
    (
        "methotrexate",
        ["7.5 milligrams", "15 milligrams"],
        "once weekly",
        "by mouth",
        ["rheumatoid arthritis", "psoriasis"],
    ),
    (
        "hydroxychloroquine",
        ["200 milligrams", "400 milligrams"],
        "once daily",
        "by mouth",
        ["systemic lupus erythematosus", "rheumatoid arthritis"],
    ),
    (
        "adalimumab",
        ["40 milligrams"],
        "every other week",
        "subcutaneously",
        ["Crohn's disease", "ankylosing spondylitis"],
    ),
    ("tacrolimus", ["1 milligram", "2 milligrams"], "every twelve hours", "by mouth", ["kidney transplant rejection"]),
    ("sumatriptan", ["50 milligrams", "100 milligrams"], "at the onset of headache", "by mouth", ["migraine"]),
    ("topiramate", ["25 milligrams", "50 milligrams"], "twice daily", "by mouth", ["migraine prophylaxis", "epilepsy"]),
    (
        "baclofen",
        ["5 milligrams", "10 milligrams"],
        "three times a day",
        "by mouth",
        ["muscle spasticity", "multiple sclerosis"],
    ),
    ("cyclobenzaprine", ["5 milligrams", "10 milligrams"], "at bedtime", "by mouth", ["muscle spasm"]),
    (
        "naproxen",
        ["250 milligrams", "500 milligrams"],
        "twice daily with food",
        "by mouth",
        ["osteoarthritis", "dysmenorrhea"],
    ),
    ("acetaminophen", ["500 milligrams", "1 gram"], "every six hours as needed", "by mouth", ["fever", "mild pain"]),
    (
        "celecoxib",
        ["100 milligrams", "200 milligrams"],
        "twice daily",
        "by mouth",
        ["osteoarthritis", "rheumatoid arthritis"],
    ),
    (
        "ketorolac",
        ["15 milligrams", "30 milligrams"],
        "every six hours",
        "intravenously",
        ["renal colic", "postoperative pain"],
    ),
    (
        "dexamethasone",
        ["4 milligrams", "6 milligrams", "10 milligrams"],
        "once daily",
        "intravenously",
        ["cerebral edema", "croup"],
    ),
    ("budesonide", ["180 micrograms", "9 milligrams"], "twice daily", "by inhaler", ["asthma", "Crohn's disease"]),
    ("ipratropium", ["500 micrograms"], "every six hours", "by nebulizer", ["chronic obstructive pulmonary disease"]),
    ("potassium chloride", ["20 milliequivalents", "40 milliequivalents"], "once daily", "by mouth", ["hypokalemia"]),
    (
        "magnesium sulfate",
        ["2 grams", "4 grams"],
        "over twenty minutes",
        "intravenously",
        ["preeclampsia", "torsades de pointes"],
    ),
    (
        "haloperidol",
        ["2 milligrams", "5 milligrams"],
        "every four hours as needed",
        "intramuscularly",
        ["acute agitation", "delirium"],
    ),
    (
        "clonazepam",
        ["0.5 milligrams", "1 milligram"],
        "twice daily",
        "by mouth",
        ["panic disorder", "seizure disorder"],
    ),
    (
        "trazodone",
        ["50 milligrams", "100 milligrams"],
        "at bedtime",
        "by mouth",
        ["insomnia", "major depressive disorder"],
    ),
    ("finasteride", ["5 milligrams"], "once daily", "by mouth", ["benign prostatic hyperplasia"]),
    ("oxybutynin", ["5 milligrams"], "twice daily", "by mouth", ["overactive bladder"]),
    ("memantine", ["5 milligrams", "10 milligrams"], "twice daily", "by mouth", ["Alzheimer's disease"]),
    ("fluticasone", ["two sprays", "250 micrograms"], "twice daily", "by inhaler", ["allergic rhinitis", "asthma"]),
    ("dapagliflozin", ["10 milligrams"], "once daily", "by mouth", ["chronic kidney disease", "heart failure"]),
    (
        "liraglutide",
        ["0.6 milligrams", "1.2 milligrams", "1.8 milligrams"],
        "once daily",
        "subcutaneously",
        ["type 2 diabetes"],
    ),
    ("glipizide", ["5 milligrams", "10 milligrams"], "before breakfast", "by mouth", ["type 2 diabetes"]),
    ("pioglitazone", ["15 milligrams", "30 milligrams"], "once daily", "by mouth", ["type 2 diabetes"]),
    ("valproate", ["250 milligrams", "500 milligrams"], "twice daily", "by mouth", ["bipolar disorder", "epilepsy"]),
    (
        "carbamazepine",
        ["200 milligrams", "400 milligrams"],
        "twice daily",
        "by mouth",
        ["trigeminal neuralgia", "epilepsy"],
    ),
    ("phenytoin", ["100 milligrams", "300 milligrams"], "three times a day", "by mouth", ["epilepsy"]),
    ("olanzapine", ["5 milligrams", "10 milligrams"], "at bedtime", "by mouth", ["schizophrenia", "bipolar disorder"]),
    (
        "risperidone",
        ["1 milligram", "2 milligrams"],
        "twice daily",
        "by mouth",
        ["schizophrenia", "irritability in autism"],
    ),
    (
        "diazepam",
        ["5 milligrams", "10 milligrams"],
        "every eight hours as needed",
        "by mouth",
        ["alcohol withdrawal", "muscle spasm"],
    ),
    (
        "methadone",
        ["10 milligrams", "30 milligrams"],
        "once daily",
        "by mouth",
        ["opioid use disorder", "chronic pain"],
    ),
]
SIDE_EFFECTS = [
    "dizziness",
    "bradycardia",
    "a dry cough",
    "hyperkalemia",
    "angioedema",
    "myalgia",
    "nausea",
    "diarrhea",
    "hypoglycemia",
    "peripheral edema",
    "drowsiness",
    "QT prolongation",
    "constipation",
    "a rash",
    "headache",
    "orthostatic hypotension",
    "tardive dyskinesia",
    "weight gain",
    "insomnia",
    "hyponatremia",
    "thrombocytopenia",
    "tinnitus",
    "photosensitivity",
    "gingival hyperplasia",
    "lactic acidosis",
    "serotonin syndrome",
    "respiratory depression",
    "agranulocytosis",
]
LABS = [
    "the INR",
    "the potassium level",
    "the creatinine",
    "the hemoglobin A1c",
    "the TSH",
    "the liver enzymes",
    "the trough level",
    "the sodium",
    "the platelet count",
    "the lipid panel",
    "the magnesium level",
    "the white cell count",
    "the eGFR",
    "the blood glucose",
    "the lithium level",
    "the QTc interval",
]
PATIENTS = [
    "The patient",
    "Mrs Alvarez",
    "Mr Okafor",
    "The nursing home resident",
    "Her father",
    "Mr Hargreaves",
    "Ms Nakamura",
    "Mrs Petrovic",
    "Mr Delacroix",
    "The teenager",
    "The elderly man in bed four",
    "Mrs Oyelaran",
    "The pregnant patient",
    "Mr Brennan",
    "Miss Castellano",
    "The new admission",
]
CLINICIANS = [
    "The pharmacist",
    "Dr Lindqvist",
    "The cardiologist",
    "The ward nurse",
    "The GP",
    "Dr Mensah",
    "The endocrinologist",
    "The on-call doctor",
    "The psychiatrist",
    "Dr Fairbanks",
    "The midwife",
    "The infectious disease team",
]
DURATIONS = [
    "for five days",
    "for seven days",
    "for ten days",
    "for two weeks",
    "for three months",
    "until the next review",
    "for six weeks",
    "indefinitely",
    "for one month",
]

TARGET_TEMPLATES = [
    "{patient} takes {drug} {dose} {freq}.",
    "Start {drug} {dose} {route} {freq}.",
    "{clinician} prescribed {drug} for {condition}.",
    "{drug} is used to treat {condition}.",
    "Give {drug} {dose} {route} {freq} {duration}.",
    "{patient} was switched from {drug} to {drug2}.",
    "Hold {drug} if the patient develops {side_effect}.",
    "Check {lab} before increasing the {drug} dose.",
    "Watch for {side_effect} after the first dose of {drug}.",
    "The usual dose of {drug} is {dose} {freq}.",
    "{patient} stopped taking {drug} because of {side_effect}.",
    "Continue {drug} {dose} {freq} and recheck {lab} in one week.",
    "{clinician} increased the {drug} to {dose} {freq}.",
    "Avoid combining {drug} with {drug2}.",
    "{drug} should be taken {freq}.",
    "The discharge medications include {drug} and {drug2}.",
    "{patient} has {condition} and is on {drug}.",
    "Monitor {lab} while on {drug}.",
    "{clinician} reduced the dose of {drug} to {dose}.",
    "{drug} {dose} was given {route} for {condition}.",
    "{patient} reports {side_effect} since starting {drug}.",
    "Taper {drug} over two weeks before stopping it.",
    "Administer {drug} {dose} {route}.",
    "{drug} and {drug2} are both indicated for {condition}.",
    "The first-line treatment for {condition} is {drug}.",
    "{clinician} recommended {drug} {dose} {freq} for {condition}.",
    "{patient} is allergic to {drug}.",
    "Do not crush the {drug} tablets.",
    "{patient} missed two doses of {drug} this week.",
    "Restart {drug} once {lab} is back to normal.",
    "{drug} was added for {condition} {duration}.",
    "{patient} needs a refill of {drug} {dose}.",
    "Order {lab} and hold the {drug} tonight.",
    "{patient} was admitted with {condition} and given {drug} {route}.",
    "The prescription reads {drug} {dose} {route} {freq}.",
]
CONDITIONS = sorted({c for *_, conditions in DRUGS for c in conditions})

# drugs the target test set names that the training lists do not (as real dictation would)
RELATED_DRUGS = ["hydroxyzine", "enalapril", "clozapine", "esomeprazole", "aspirin", "clonidine", "ibuprofen"]


def _drug_slots(rng: random.Random) -> dict[str, str]:
    drug, doses, freq, route, conditions = rng.choice(DRUGS)
    condition = rng.choice(conditions)
    # a second drug for the same condition (else any of this drug's conditions, else the same route), so that
    # "switched from X to Y" and "X and Y are both indicated for ..." read as a clinician would write them
    others = [d for d in DRUGS if d[0] != drug]
    alternatives = (
        [d[0] for d in others if condition in d[4]]
        or [d[0] for d in others if set(conditions) & set(d[4])]
        or [d[0] for d in others if d[3] == route]
    )
    other = rng.choice(alternatives)
    return {
        "drug": drug,
        "dose": rng.choice(doses),
        "freq": freq,
        "route": route,
        "condition": condition,
        "drug2": other,
        "side_effect": rng.choice(SIDE_EFFECTS),
        "lab": rng.choice(LABS),
        "patient": rng.choice(PATIENTS),
        "clinician": rng.choice(CLINICIANS),
        "duration": rng.choice(DURATIONS),
    }


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def generate(templates: list[str], slots_of, n: int, rng: random.Random) -> list[str]:
    """`n` distinct sentences, templates used in turn so that every structure is represented."""
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(sentences) < n:
        template = templates[attempts % len(templates)]
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"only {len(sentences)} distinct sentences after {attempts} attempts")
        sentence = _fill(template, slots_of(rng))
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def source_train(seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return generate(SOURCE_TEMPLATES, lambda r: {k: r.choice(v) for k, v in SOURCE_SLOTS.items()}, N_SOURCE, rng)


def target_train(seed: int = SEED) -> list[str]:
    rng = random.Random(seed + 1)
    return generate(TARGET_TEMPLATES, _drug_slots, N_TARGET, rng)


def lexicon(seed: int = SEED) -> list[str]:
    """Sentences of words drawn from a broad English vocabulary (examples/source/vocabulary.txt): the
    paired speech a TLE learns to pronounce from must cover far more words than 45 templates hold.

    vocabulary.txt lists the whole-word entries of Whisper's English BPE vocabulary (GPT-2's, in merge
    order, so the frequent words come first) and, prefixed with "-", its word-internal pieces; the drug
    names of the target domain (and the related words its test set uses) are not in it, and no sentence
    contains one. Each sentence: 6-12 words, frequent words favoured, one word in eight a pseudo-word of
    two or three pieces (the sound patterns of rare and technical words).
    """
    entries = _read(HERE / "source" / "vocabulary.txt")
    words = [e for e in entries if not e.startswith("-")]
    pieces = [e[1:] for e in entries if e.startswith("-")]
    banned = [re.compile(rf"\b{re.escape(t)}") for t in sorted(_drug_words())]
    rng = random.Random(seed + 2)
    sentences: list[str] = []
    seen: set[str] = set()
    while len(sentences) < N_LEXICON:
        picked = []
        for _ in range(rng.randint(6, 12)):
            if rng.random() < 0.125:
                picked.append("".join(pieces[int(len(pieces) * rng.random() ** 1.5)] for _ in range(rng.randint(2, 3))))
            else:
                picked.append(words[int(len(words) * rng.random() ** 2)])
        sentence = " ".join(picked)
        sentence = sentence[0].upper() + sentence[1:] + "."
        if sentence not in seen and not any(b.search(sentence.lower()) for b in banned):
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def vocabulary(tokenizer_json: Path) -> list[str]:
    """vocabulary.txt from a Whisper English tokenizer.json (tiny.en's: `whistle import-ct2`): its whole-word
    entries ("Ġword", 3+ lower-case letters, not a drug name) in id order, then "-" + its word-internal
    pieces (2+ lower-case letters)."""
    import json

    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    entries = sorted(vocab, key=vocab.__getitem__)
    drugs = _drug_words()
    words = [e[1:] for e in entries if e.startswith("Ġ") and re.fullmatch(r"[a-z]{3,}", e[1:]) and e[1:] not in drugs]
    return words + ["-" + e for e in entries if re.fullmatch(r"[a-z]{2,}", e)]


def _drug_words() -> set[str]:
    """The target domain's drug names (and the related ones its test set adds), lower case."""
    return {w for d in DRUGS for w in re.findall(r"[a-z]+", d[0])} | set(RELATED_DRUGS)


def domain_terms() -> set[str]:
    """Drug names and conditions, lower case: a target test sentence must use at least one."""
    return {d[0] for d in DRUGS} | {c.lower() for c in CONDITIONS}


def _read(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check() -> list[str]:
    problems = []
    built = {"source/train.txt": source_train(), "target/train.txt": target_train(), "source/lexicon.txt": lexicon()}
    for name, sentences in built.items():
        if _read(HERE / name) != sentences:
            problems.append(f"examples/{name} differs from what make_corpora.py builds: rerun it")
    train = set().union(*built.values())
    problems += [
        f"examples/source/vocabulary.txt holds the drug name {e!r}: regenerate it with --vocabulary"
        for e in _read(HERE / "source" / "vocabulary.txt")
        if e in _drug_words()
    ]
    terms = domain_terms()
    for domain in ("source", "target"):
        test = _read(HERE / domain / "test.txt")
        if len(test) != len(set(test)):
            problems.append(f"examples/{domain}/test.txt repeats a sentence")
        problems += [f"examples/{domain}/test.txt: {s!r} is also a training sentence" for s in test if s in train]
        if domain == "target":
            problems += [
                f"examples/target/test.txt: {s!r} uses no drug or condition from the lists"
                for s in test
                if not any(re.search(rf"\b{re.escape(t)}\b", s.lower()) for t in terms)
            ]
    return problems


def main() -> None:
    if sys.argv[1:2] == ["--vocabulary"] and len(sys.argv) == 3:
        entries = vocabulary(Path(sys.argv[2]))
        (HERE / "source" / "vocabulary.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
        print(f"wrote {len(entries)} entries to {HERE / 'source' / 'vocabulary.txt'}")
        return
    if sys.argv[1:] == ["--check"]:
        problems = check()
        print("\n".join(problems) or "examples are consistent")
        sys.exit(1 if problems else 0)
    for name, sentences in (
        ("source/train.txt", source_train()),
        ("target/train.txt", target_train()),
        ("source/lexicon.txt", lexicon()),
    ):
        path = HERE / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        print(f"wrote {len(sentences)} sentences to {path}")


if __name__ == "__main__":
    main()
