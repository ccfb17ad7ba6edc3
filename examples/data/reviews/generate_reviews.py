#!/usr/bin/env python3
"""Generate reviews.csv: a deliberately messy, fictional product-review table.

Every product, brand and sentence fragment below was written for tuneforge's
examples. The script uses only the standard library and a fixed seed, so
running it again reproduces reviews.csv byte for byte:

    python examples/data/reviews/generate_reviews.py

The mess is intentional (see README.md): an unnamed index column, empty cells,
HTML entities, multi-line quoted fields, embedded quotes and commas, stray
whitespace and a few exact duplicate rows.
"""

import csv
import datetime
import os
import random

SEED = 20240611
N_UNIQUE = 590  # plus N_DUPLICATES exact copies = 600 data rows
N_DUPLICATES = 10
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reviews.csv")

# ---------------------------------------------------------------------------
# Products, grouped by category. Each category has aspects; each aspect has
# positive sentences and negative sentences written for that kind of product.
# ---------------------------------------------------------------------------

CATEGORIES = {
    "headphones": {
        "products": ["Halden Aria Over-Ear Headphones", "Quillo Pulse Wireless Earbuds"],
        "noun": "headphones",
        "aspects": {
            "sound": (
                [
                    "The sound is rich and detailed, and the bass is punchy without drowning out vocals.",
                    "Podcasts and music both sound clear, even at low volume.",
                    "I keep hearing little details in old albums that I never noticed before.",
                    "Mids are warm and the treble never gets harsh, even on long listening sessions.",
                ],
                [
                    "The sound is muddy, with boomy bass that swallows the vocals.",
                    "There's a constant faint hiss whenever nothing is playing, which drives me mad.",
                    "Anything above half volume starts to distort and crackle.",
                    "Voices in films sound thin and far away, like they're coming from another room.",
                ],
            ),
            "comfort": (
                [
                    "I wore them on a nine hour flight and forgot they were on my head.",
                    "The ear cushions are soft and don't make my ears sweaty.",
                    "They stay put during runs, even when I'm sweating a lot.",
                    "Clamping force is just right, snug but no headache.",
                ],
                [
                    "After about an hour the headband presses on the top of my head and I have to take them off.",
                    "They fall out of my ears every time I look down, none of the tip sizes fit properly.",
                    "The pads get hot and sticky within twenty minutes.",
                    "They pinch behind my glasses so badly that I can't wear them for a whole film.",
                ],
            ),
            "battery": (
                [
                    "Battery easily lasts a full work week of commuting between charges.",
                    "Ten minutes on the charger gives me a couple of hours of music, "
                    "which has saved me more than once.",
                    "I charge them maybe once a week and they've never died on me.",
                ],
                [
                    'The "40 hour battery" is more like 15 hours in real use.',
                    "Battery life has halved since I bought them, and it's only been a few months.",
                    "The left bud always dies an hour before the right one.",
                ],
            ),
            "noise": (
                [
                    "Noise cancelling wipes out the hum of the train completely.",
                    "The office chatter just disappears when I switch on noise cancelling.",
                    "Transparency mode sounds natural, so I can order a coffee without taking them off.",
                ],
                [
                    "Noise cancelling barely does anything, I can still hear every conversation on the bus.",
                    "With noise cancelling on there's a pressure feeling in my ears and a faint whine.",
                    "Wind noise is awful outdoors, it roars in the microphones.",
                ],
            ),
            "connection": (
                [
                    "Pairing took seconds and they switch between my laptop and phone without fuss.",
                    "People on calls say my voice sounds clear, even outside.",
                    "Bluetooth range is great, I can leave my phone in the kitchen and walk around the flat.",
                ],
                [
                    "The connection drops every few minutes if my phone is in my back pocket.",
                    "On calls people say I sound like I'm underwater.",
                    "There's a noticeable delay when watching videos, lips and voices don't match.",
                ],
            ),
        },
    },
    "kettle": {
        "products": ["Brightwell 1.7L Electric Kettle", "Tamsin Gooseneck Pour-Over Kettle"],
        "noun": "kettle",
        "aspects": {
            "speed": (
                [
                    "It boils a full jug in about three minutes, much faster than my old one.",
                    "Water for one cup is ready before I've even found a mug.",
                    "The temperature presets are spot on, 80 degrees for green tea is exactly 80.",
                ],
                [
                    'The "rapid boil" claim is generous, it takes ages even for a single cup.',
                    "The temperature setting is off by several degrees according to my thermometer.",
                    "It switches off before the water has actually boiled, so I have to press it twice.",
                ],
            ),
            "noise": (
                [
                    "It's quiet enough that I can make tea early without waking anyone.",
                    "Much quieter than the roaring kettle we had before.",
                ],
                [
                    "It's incredibly loud, like a jet engine on the kitchen counter.",
                    "It makes a high pitched whistle from the base that has nothing to do with the water.",
                ],
            ),
            "build": (
                [
                    "The lid opens with one button and the handle stays cool.",
                    "The gooseneck spout gives a slow, steady pour that's perfect for filter coffee.",
                    "Brushed steel looks smart and doesn't show fingerprints.",
                    "The water window is easy to read and the base lets you put it down at any angle.",
                ],
                [
                    "It leaks from the bottom of the water window, so there's always a puddle under the base.",
                    "The lid won't stay shut and pops open while it's boiling.",
                    "The handle gets so hot I have to use a tea towel to pour.",
                    "The spout dribbles down the side no matter how slowly I pour.",
                ],
            ),
            "taste": (
                [
                    "No plastic taste at all, even from the very first boil.",
                    "The inside is all steel so the water tastes like water.",
                    "Limescale wipes off easily with a bit of vinegar.",
                ],
                [
                    "Everything tastes of plastic, even after boiling and throwing out ten loads of water.",
                    "A chemical smell comes off it every time it heats up.",
                    "Rust spots appeared inside after a couple of weeks.",
                ],
            ),
        },
    },
    "backpack": {
        "products": ["Trailnest 28L Daypack", "Corvane Commuter Backpack"],
        "noun": "backpack",
        "aspects": {
            "space": (
                [
                    "There's a place for everything: laptop, lunch box, charger and a jumper, with room to spare.",
                    "The pockets are really well thought out, I can find my keys without unpacking everything.",
                    "It fits a 16 inch laptop easily and still looks slim.",
                ],
                [
                    "It's much smaller than the pictures suggest, my lunch box barely fits next to the laptop.",
                    "The pockets are in weird places and the water bottle pocket is too shallow, my bottle falls out.",
                    "The laptop sleeve is too tight for a 15 inch laptop, despite the listing.",
                ],
            ),
            "comfort": (
                [
                    "The padded straps spread the weight well, my shoulders don't ache after the commute.",
                    "The back panel has air channels, so I don't arrive at work with a soaked shirt.",
                    "The chest strap and hip belt make a real difference on longer hikes.",
                ],
                [
                    "The straps dig into my shoulders after ten minutes.",
                    "It has no structure, everything sags to the bottom and pulls me backwards.",
                    "The back panel is a hard plastic sheet that presses right on my spine.",
                ],
            ),
            "material": (
                [
                    "Got caught in a proper downpour and everything inside stayed dry.",
                    "The fabric is thick and tough, it still looks new after a year of daily use.",
                    "It wipes clean easily, which matters with a toddler.",
                ],
                [
                    'So much for "water resistant", my notebook was soaked after a ten minute walk in drizzle.',
                    "The fabric started fraying along the bottom seam within a month.",
                    "The colour faded badly after one summer.",
                ],
            ),
            "zips": (
                [
                    "The zips run smoothly and the pulls are easy to grab with gloves on.",
                    "The stitching is neat and reinforced at the stress points.",
                    "Hidden back pocket for my passport is brilliant when travelling.",
                ],
                [
                    "The main zip split open on the second day.",
                    "One shoulder strap tore away from the bag at the stitching.",
                    "The zip pulls snapped off within a week, I'm using paperclips now.",
                ],
            ),
        },
    },
    "phone case": {
        "products": ["Shellform Slim Phone Case", "Armadyne Rugged Phone Case"],
        "noun": "case",
        "aspects": {
            "protection": (
                [
                    "My phone has been dropped on concrete twice and there's not a scratch on it.",
                    "The raised edge around the camera has saved the lenses more than once.",
                    "It survived my toddler throwing my phone down the stairs.",
                ],
                [
                    '"Military grade drop protection", yet my screen cracked from waist height.',
                    "The corners are so thin that the first drop dented the phone frame.",
                    "It doesn't cover the camera bump at all, so the lens got scratched.",
                ],
            ),
            "fit": (
                [
                    "It fits like a glove and the buttons are still easy to press.",
                    "Cut-outs line up perfectly with the ports, even my thick charger cable fits.",
                    "It's slim enough that my phone still slides into my jeans pocket.",
                ],
                [
                    "The buttons are so stiff that I have to press the volume key really hard.",
                    "The port cut-out is too narrow for most of my cables.",
                    "It's so bulky that my phone no longer fits in my pocket or my car holder.",
                ],
            ),
            "grip": (
                [
                    "The textured sides give a great grip, it doesn't slip off the sofa arm any more.",
                    "Wireless charging works perfectly through it, and the magnets are strong.",
                    "Feels soft but not sticky, and it doesn't collect pocket fluff.",
                ],
                [
                    "It's slippery as soap, I've nearly dropped the phone several times.",
                    "Wireless charging stopped working once the case was on.",
                    "The back collects dust and lint like a magnet.",
                ],
            ),
            "looks": (
                [
                    "After eight months the clear back is still clear, no yellowing at all.",
                    "The colour is even nicer in person than in the photos.",
                    "It looks premium, friends keep asking where I got it.",
                ],
                [
                    "The clear back turned yellow within three weeks.",
                    "The coating started peeling off the edges after a month.",
                    "The colour is nothing like the photos, it's a dull grey instead of blue.",
                ],
            ),
        },
    },
    "desk lamp": {
        "products": ["Lumora LED Desk Lamp"],
        "noun": "lamp",
        "aspects": {
            "light": (
                [
                    "The light is bright and even, with no harsh spots on the desk.",
                    "I love that I can switch from warm to cool white, "
                    "reading in the evening is so much easier on the eyes.",
                    "Brightness goes really low, which is perfect as a night light for the baby's room.",
                ],
                [
                    "There's a visible flicker on the lowest settings that gives me a headache.",
                    "Even on the brightest setting it barely lights up half of my desk.",
                    "The so-called warm white is a cold bluish colour.",
                ],
            ),
            "controls": (
                [
                    "The touch controls respond instantly and remember my last setting.",
                    "The built-in timer that turns it off after an hour is handy for reading in bed.",
                ],
                [
                    "The touch controls react to any brush of the sleeve and switch it off randomly.",
                    "It forgets the brightness every time, so I have to set it again each evening.",
                ],
            ),
            "build": (
                [
                    "The arm holds its position wherever I put it, no drooping.",
                    "The weighted base is solid, it doesn't tip even fully extended.",
                    "The USB port in the base is great for charging my phone overnight.",
                ],
                [
                    "The arm slowly droops until the lamp is pointing at the desk.",
                    "The hinge cracked after a few weeks of normal adjusting.",
                    "The base is so light that the lamp tips over when the arm is extended.",
                ],
            ),
        },
    },
    "blender": {
        "products": ["Vortaro Personal Blender"],
        "noun": "blender",
        "aspects": {
            "power": (
                [
                    "It crushes frozen fruit and ice into a silky smoothie in under a minute.",
                    "Even spinach and oats come out completely smooth, no gritty bits.",
                    "Makes nut butter without overheating, which I didn't expect from something this small.",
                ],
                [
                    "It can't handle frozen fruit at all, the blade just spins in an air pocket.",
                    "The motor smells like it's burning after thirty seconds of blending.",
                    "There are always chunks of kale left at the bottom no matter how long I run it.",
                ],
            ),
            "design": (
                [
                    "I blend straight into the cup, screw on the lid and take it to work.",
                    "Cleaning is a quick rinse, and the cups are dishwasher safe.",
                    "It's small enough to live on the counter without getting in the way.",
                ],
                [
                    "The blade seal leaks, so smoothie ends up all over the base.",
                    "The cups cracked after a few runs through the dishwasher.",
                    "The travel lid doesn't seal, my bag got covered in smoothie.",
                ],
            ),
            "noise": (
                [
                    "It's surprisingly quiet for how powerful it is.",
                    "Stable on the counter, it doesn't walk around while blending.",
                ],
                ["It's so loud that the dog leaves the room.", "It vibrates across the counter unless I hold it down."],
            ),
        },
    },
    "water bottle": {
        "products": ["Frostline Insulated Bottle 750ml"],
        "noun": "bottle",
        "aspects": {
            "insulation": (
                [
                    "Ice is still in there at the end of a hot day at the beach.",
                    "Tea poured at 7am is still hot enough to drink at lunchtime.",
                    "The outside never sweats, so no wet rings on my desk.",
                ],
                [
                    "Cold water is lukewarm by lunchtime, the insulation barely works.",
                    "The outside gets condensation, which means the vacuum seal has failed.",
                    "Hot drinks are cold within two hours.",
                ],
            ),
            "lid": (
                [
                    "The lid is completely leak proof, I throw it in my bag upside down.",
                    "The straw lid is easy to drink from while cycling.",
                    "The carry loop is sturdy and the wide mouth fits ice cubes.",
                ],
                [
                    "The lid leaks whenever the bottle lies on its side.",
                    "The straw lid mechanism broke after a fortnight.",
                    "The mouth is too narrow for ice cubes and impossible to clean inside.",
                ],
            ),
            "build": (
                [
                    "It took a fall on the pavement and only has a tiny dent.",
                    "It fits in my car cup holder and the side pocket of my bag.",
                    "No metallic taste, even with coffee.",
                ],
                [
                    "The paint chipped off the first time I knocked it against a table.",
                    "Everything I drink from it tastes metallic.",
                    "It's too wide for any cup holder I own.",
                ],
            ),
        },
    },
    "speaker": {
        "products": ["Boomlet Mini Bluetooth Speaker"],
        "noun": "speaker",
        "aspects": {
            "sound": (
                [
                    "Amazing volume for something that fits in my palm, and the bass is surprisingly deep.",
                    "It filled the whole garden at our barbecue without distorting.",
                    "Voices on podcasts are crisp, great for the shower.",
                ],
                [
                    "The sound is tinny, with no bass whatsoever.",
                    "It rattles and buzzes as soon as you turn it past half volume.",
                    "It's so quiet that I can't hear it over the extractor fan.",
                ],
            ),
            "battery": (
                ["The battery lasts a whole weekend of camping.", "It charges over USB-C in a couple of hours."],
                [
                    "The battery dies after about three hours, not the twelve promised.",
                    "It won't charge any more unless the cable is held at a certain angle.",
                ],
            ),
            "build": (
                [
                    "It fell into the pool and kept on playing.",
                    "Pairing is instant and it reconnects to my phone by itself.",
                    "The strap makes it easy to hang from a tent or a bike.",
                ],
                [
                    "A little splash in the bathroom and it stopped working, so much for being waterproof.",
                    'It keeps disconnecting and announcing "pairing" at full volume.',
                    "The rubber coating became sticky after a few months.",
                ],
            ),
        },
    },
    "yoga mat": {
        "products": ["Greypine Yoga Mat 6mm"],
        "noun": "mat",
        "aspects": {
            "grip": (
                [
                    "Grip is excellent, even in hot yoga my hands don't slide in downward dog.",
                    "It stays flat on the floor and doesn't bunch up.",
                ],
                [
                    "My hands slide all over it as soon as I start to sweat.",
                    "It slides around on my wooden floor and the edges curl up.",
                ],
            ),
            "comfort": (
                [
                    "The 6mm thickness is kind to my knees during long floor sessions.",
                    "Cushioned but firm enough that I don't wobble in balance poses.",
                ],
                [
                    "Way too thin, my knees hurt on the hard floor.",
                    "It's so squishy that balancing poses are a nightmare.",
                ],
            ),
            "material": (
                [
                    "No rubbery smell, even fresh out of the packaging.",
                    "After a year of daily practice it still looks new.",
                    "The carrying strap is a nice touch and it's light enough to take to class.",
                ],
                [
                    "The chemical smell was so strong I had to leave it on the balcony for a week.",
                    "The surface started flaking after a month and leaves bits on my clothes.",
                    "It tore at the corner the first time I rolled it up.",
                ],
            ),
        },
    },
    "umbrella": {
        "products": ["Stormkin Compact Umbrella"],
        "noun": "umbrella",
        "aspects": {
            "wind": (
                [
                    "It has survived some serious coastal wind without turning inside out.",
                    "When it does flip in a gust, it pops straight back without bending a rib.",
                ],
                [
                    "The first gust turned it inside out and snapped two ribs.",
                    "It bends and wobbles in even a light breeze.",
                ],
            ),
            "size": (
                [
                    "It folds small enough to live in my handbag every day.",
                    "Open, it's big enough to keep my shoulders and bag dry.",
                ],
                [
                    "The canopy is tiny, my shoulders get soaked every time.",
                    "It's far too heavy and long to carry around in a bag.",
                ],
            ),
            "mechanism": (
                [
                    "The one-button open and close works every time, very handy when getting into the car.",
                    "It dries quickly and the cover is easy to slide back on.",
                ],
                [
                    "The auto-open button jammed after a couple of weeks.",
                    "It opens by itself inside my bag, which is as annoying as it sounds.",
                    "The handle came off in my hand.",
                ],
            ),
        },
    },
    "toaster": {
        "products": ["Crumbright 2-Slice Toaster"],
        "noun": "toaster",
        "aspects": {
            "toasting": (
                [
                    "It browns both sides evenly, edge to edge.",
                    "Setting 3 gives perfect golden toast every single morning.",
                    "The bagel setting toasts only the cut side, exactly as it should.",
                ],
                [
                    "One side comes out black and the other is still pale.",
                    "The settings make no sense, 2 is barely warm and 3 is burnt.",
                    "It doesn't pop up on its own half the time, so the toast burns.",
                ],
            ),
            "design": (
                [
                    "The wide slots take thick sourdough and crumpets without any trouble.",
                    "The crumb tray slides out easily, so cleaning takes ten seconds.",
                    "The outside stays cool to the touch, which is great with kids around.",
                ],
                [
                    "The slots are too narrow for anything but thin sliced bread.",
                    "The sides get dangerously hot, my son burned his fingers.",
                    "The crumb tray is stuck and crumbs end up all over the counter.",
                ],
            ),
        },
    },
    "power bank": {
        "products": ["Voltwren 10000mAh Power Bank"],
        "noun": "power bank",
        "aspects": {
            "capacity": (
                [
                    "It charges my phone twice from empty and still has some left.",
                    "Got me through a three day festival with no wall socket in sight.",
                ],
                [
                    "It barely gives one full phone charge, nowhere near the stated capacity.",
                    "It loses its charge sitting in a drawer for a week.",
                ],
            ),
            "speed": (
                [
                    "Fast charging works, my phone goes from 10 to 60 percent in half an hour.",
                    "It can charge my phone and earbuds at the same time.",
                ],
                [
                    "It charges painfully slowly, slower than my laptop USB port.",
                    "Only one of the ports actually works.",
                ],
            ),
            "build": (
                [
                    "It's slim and light, barely noticeable in my pocket.",
                    "The little display showing the exact percentage is really useful.",
                ],
                ["It gets worryingly hot while charging.", "The casing cracked after one drop from the sofa."],
            ),
        },
    },
}

# ---------------------------------------------------------------------------
# Generic fragments shared by all categories.
# ---------------------------------------------------------------------------

DURATIONS = [
    "two weeks",
    "a month",
    "three months",
    "six months",
    "a year",
    "about ten days",
    "almost two years",
    "a few weeks",
    "eight months",
]
PEOPLE = ["wife", "husband", "son", "daughter", "mum", "dad", "flatmate", "partner", "sister", "brother", "grandad"]
COLOURS = ["black", "sage green", "navy", "white", "sand", "red", "grey"]

POS_OPEN = [
    "Bought this for my {who} and ended up getting one for myself too.",
    "I've had the {noun} for {dur} now and I'm genuinely impressed.",
    "Replaced an old one that finally gave up, and this is a big step up.",
    "Honestly exceeded my expectations.",
    "Did a lot of research before buying and I'm glad I went with this one.",
    "This is my second one, the first is still going strong at my parents' place.",
    "I was sceptical at this price, but it's been great.",
    "Quick update after {dur}: still happy.",
    "My {who} recommended it, and they were right.",
    "Short version: get it.",
]
NEG_OPEN = [
    "I really wanted to like this {noun}.",
    "Returned it after {dur}.",
    "Was excited when it arrived, that didn't last long.",
    "Bought this based on the reviews and I can't see what people are talking about.",
    "Second unit, same problem as the first.",
    "Gave it a fair chance for {dur}.",
    "Bought it as a gift for my {who}, which was embarrassing in the end.",
    "Not what I expected for the price.",
    "Where do I start.",
    "Update after {dur}: it's gone downhill.",
]
CONTEXT = [
    "I use it every day.",
    "Ordered the {colour} one.",
    "Mostly use it at work.",
    "I got it on sale.",
    "We use it at home and when travelling.",
    "I bought it to replace a cheap one.",
    "I'm fairly picky about this kind of thing.",
]
POS_MINOR = [
    "Only downside is that the instructions are tiny, but that's nitpicking.",
    "If I had to complain, the box it came in was far bigger than it needed to be.",
    "It's a bit pricier than similar ones, but you get what you pay for.",
    "I wish it came in more colours, that's my only gripe.",
    "The cable is a bit short, which is a minor thing.",
    "Took a day or two to get used to, but now I love it.",
    "Knocked off a star only because delivery took over a week.",
]
NEG_SILVER = [
    "The {colour} colour is nice, I'll give it that, but it doesn't make up for the rest.",
    "Looks great in person, shame about everything else.",
    "It worked fine for the first few days, then the problems started.",
    "Packaging was lovely, which makes the product even more disappointing.",
    "On paper it ticks every box, in practice not so much.",
]
POS_SERVICE = [
    "Delivery was quick and it was well packed.",
    "Had a question for customer service and they answered within an hour.",
    "One part arrived scratched and the seller sent a new one without any fuss.",
    "Arrived a day earlier than expected.",
]
NEG_SERVICE = [
    "Customer service stopped replying after my second email.",
    "The seller wants me to pay for return postage, which is ridiculous.",
    "The box arrived crushed and it took two weeks to get here.",
    "Support just sent me a link to the manual and closed the ticket.",
]
POS_CLOSE = [
    "Would buy again.",
    "Five stars from me.",
    "Recommended without hesitation.",
    "Great value for money.",
    "No regrets at all.",
    "Can't fault it.",
    "Already ordered another as a gift.",
    "Does exactly what it says on the box, and does it well.",
    "Very happy with it.",
]
NEG_CLOSE = [
    "Save your money.",
    "Would not recommend.",
    "Asking for a refund.",
    "Going back to my old one.",
    "One star is generous.",
    "Avoid.",
    "Really disappointed.",
    "Back in the box it goes.",
    "Not worth the hassle.",
]
POS_QUOTE = [
    'My {who} called it "the best thing you\'ve bought all year", high praise from them.',
    "It's one of those purchases where you think \"why didn't I get this sooner\".",
]
NEG_QUOTE = [
    'The listing says "premium quality", which is a stretch, to put it kindly.',
    'My {who} took one look and said "you got ripped off", and they were right.',
]
POS_AMP = ["Quality & value are both excellent.", "Form & function, both spot on."]
NEG_AMP = ["Poor quality & poor support.", "Style over substance, & not even much style."]

POS_TITLES = [
    "Great {noun}",
    "Exactly what I needed",
    "Worth every penny",
    "Solid",
    "Love it!",
    "Better than expected",
    "Does the job really well",
    "Very happy",
    "Brilliant",
    "Highly recommend",
    "So glad I bought this",
    "Great value",
    "Five stars",
    "Impressed",
    "Perfect for daily use",
    "Best {noun} I've owned",
    "No complaints",
]
NEG_TITLES = [
    "Disappointed",
    "Broke after {dur}",
    "Not as described",
    "Don't bother",
    "Meh... returned it",
    "Waste of money",
    "Poor quality",
    "Stopped working",
    "Not worth it",
    "Avoid this {noun}",
    "Really poor",
    "Cheaply made",
    "Would give zero stars if I could",
    "Expected much more",
    "Returned",
]


def fill(rng, text, noun):
    return text.format(who=rng.choice(PEOPLE), dur=rng.choice(DURATIONS), colour=rng.choice(COLOURS), noun=noun)


def compose(rng, cat, positive, rating):
    """Return (title, review_sentences) for one review."""
    info = CATEGORIES[cat]
    noun = info["noun"]
    aspects = list(info["aspects"].keys())
    rng.shuffle(aspects)
    k = rng.choice([1, 2, 2, 3, 3, 4])
    parts = []
    if rng.random() < 0.45:
        parts.append(rng.choice(POS_OPEN if positive else NEG_OPEN))
    if rng.random() < 0.2:
        parts.append(rng.choice(CONTEXT))
    for a in aspects[:k]:
        pos_list, neg_list = info["aspects"][a]
        parts.append(rng.choice(pos_list if positive else neg_list))
    if positive:
        if rng.random() < (0.55 if rating == 4 else 0.12):
            minor = POS_MINOR if rating == 4 else [m for m in POS_MINOR if "star" not in m]
            parts.append(rng.choice(minor))
        if rng.random() < 0.15:
            parts.append(rng.choice(POS_SERVICE))
        if rng.random() < 0.06:
            parts.append(rng.choice(POS_QUOTE))
        if rng.random() < 0.05:
            parts.append(rng.choice(POS_AMP))
        if rng.random() < 0.5:
            parts.append(rng.choice(POS_CLOSE))
        title = rng.choice(POS_TITLES)
    else:
        if rng.random() < (0.35 if rating == 2 else 0.12):
            parts.insert(min(1, len(parts)), rng.choice(NEG_SILVER))
        if rng.random() < 0.18:
            parts.append(rng.choice(NEG_SERVICE))
        if rng.random() < 0.06:
            parts.append(rng.choice(NEG_QUOTE))
        if rng.random() < 0.05:
            parts.append(rng.choice(NEG_AMP))
        if rng.random() < 0.5:
            parts.append(rng.choice(NEG_CLOSE))
        title = rng.choice(NEG_TITLES)
    # de-duplicate sentences while keeping order
    seen, uniq = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    sents = [fill(rng, p, noun) for p in uniq]
    return fill(rng, title, noun), sents


def html_mangle(text):
    return text.replace("&", "&amp;").replace("'", "&#039;").replace('"', "&quot;")


def make_row(rng):
    cat = rng.choice(sorted(CATEGORIES))
    product = rng.choice(CATEGORIES[cat]["products"])
    positive = rng.random() < 0.5
    rating = rng.choice([4, 5, 5]) if positive else rng.choice([1, 1, 2])
    while True:
        title, sents = compose(rng, cat, positive, rating)
        words = sum(len(s.split()) for s in sents)
        if 15 <= words <= 120:
            break
    # layout: mostly one paragraph; some multi-line
    r = rng.random()
    if r < 0.06 and len(sents) >= 2:
        cut = rng.randrange(1, len(sents))
        sep = rng.choice(["\n", "\n\n"])
        review = " ".join(sents[:cut]) + sep + " ".join(sents[cut:])
    else:
        review = " ".join(sents)
    sentiment = "positive" if positive else "negative"
    start = datetime.date(2021, 1, 1).toordinal()
    end = datetime.date(2024, 12, 31).toordinal()
    date = datetime.date.fromordinal(rng.randint(start, end)).isoformat()
    votes = int(rng.paretovariate(1.6)) - 1
    if rng.random() < 0.55:
        votes = 0 if rng.random() < 0.6 else rng.randint(1, 4)
    votes = min(votes, 240)
    row = {
        "product": product,
        "title": title,
        "review": review,
        "rating": str(rating),
        "sentiment": sentiment,
        "date": date,
        "helpful_votes": str(votes),
    }

    # ---- deliberate mess ----
    if rng.random() < 0.15:  # HTML entities (only counts if there is something to escape)
        row["review"] = html_mangle(row["review"])
        if rng.random() < 0.5:
            row["title"] = html_mangle(row["title"])
    if rng.random() < 0.04:
        row["review"] = "  " + row["review"]
    if rng.random() < 0.04:
        row["review"] = row["review"] + rng.choice([" ", "  ", "\t", " \n"])
    if rng.random() < 0.05 and " " in row["review"]:
        spaces = [i for i, ch in enumerate(row["review"]) if ch == " "]
        i = rng.choice(spaces)
        row["review"] = row["review"][:i] + "  " + row["review"][i + 1 :]
    if rng.random() < 0.03:
        row["title"] = row["title"] + " "
    if rng.random() < 0.02:
        row["product"] = " " + row["product"] + " "
    if rng.random() < 0.05:
        row["review"] = ""
    elif rng.random() < 0.07:
        row["title"] = ""
    r = rng.random()
    if r < 0.01:
        row["rating"] = ""
        row["sentiment"] = ""
    elif r < 0.02:
        row["rating"] = ""
    elif r < 0.03:
        row["sentiment"] = ""
    return row


COLUMNS = ["product", "title", "review", "rating", "sentiment", "date", "helpful_votes"]


def main():
    rng = random.Random(SEED)
    rows = [make_row(rng) for _ in range(N_UNIQUE)]
    # exact duplicates: copies of earlier rows re-inserted later in the table
    for src in sorted(rng.sample(range(N_UNIQUE - 50), N_DUPLICATES)):
        copy = dict(rows[src])  # rows before any insertion point are unchanged
        pos = rng.randint(N_UNIQUE - 40, len(rows))
        rows.insert(pos, copy)
    with open(OUT, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([""] + COLUMNS)
        for i, row in enumerate(rows):
            w.writerow([str(i)] + [row[c] for c in COLUMNS])
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
