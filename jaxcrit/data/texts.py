"""Text sources: the paper's default paragraph and text files evaluated the reference's way."""
from __future__ import annotations

from pathlib import Path

from jaxcrit.errors import JaxcritError

# The reference's default input (its README's Stage 1 command): a WikiText paragraph on Bookends.
BOOKENDS = (
    "Later reviews were more positive. In just over 29 minutes, Bookends is stunning in its vision "
    "of a bewildered America in search of itself, said AllMusic writer Thom Jurek, who gave it five "
    "stars out of five. Pitchfork Media's Stephen M. Deusner called Bookends the moment in which the "
    "duo were settling into themselves, losing their folk revival pretensions and emphasizing quirky "
    "production techniques to match their soaring vocals. The A.V. Club called it the group's most "
    "musically and conceptually daring album."
)

PARAGRAPH_CHARS = 50   # a corpus row is a paragraph when longer than this, stripped (the reference's rule)


def corpus_file(path: str | Path) -> Path:
    """The text file a corpus names: the file itself, a directory's one *.raw / *.txt file (a
    WikiText split unpacked: wiki.test.raw beside its notes, as tests/data/wikitext holds it), or a
    dataset repository's file on the Hugging Face Hub, hf-dataset:ORG/NAME/path/in/repo[@REVISION]
    (data/hub.py; an existing local path of that name wins)."""
    from jaxcrit.data import hub
    p = Path(path)
    name = None if p.exists() else hub.dataset_name(str(path))
    if name:
        return hub.dataset_file(name)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix in (".raw", ".txt") and q.is_file())
        if len(found) != 1:
            raise JaxcritError(f"{p}: a corpus directory must hold exactly one *.raw or *.txt file "
                               f"(it holds {len(found)}); name the file instead")
        return found[0]
    if not p.is_file():
        raise JaxcritError(f"{p}: no such text file")
    return p


def read_paragraphs(path: str | Path, min_chars: int = PARAGRAPH_CHARS, limit: int = 0) -> list[str]:
    """The rows of a text file (or corpus directory, corpus_file) that the reference's WikiText
    evaluation keeps: each row stripped, kept if longer than min_chars, in file order; limit 0: all.
    On the WikiText test split that is 1,940 of 2,891 rows."""
    p = corpus_file(path)
    rows = [r.strip() for r in p.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if len(r) > min_chars]
    if not rows:
        raise JaxcritError(f"{p}: no row longer than {min_chars} characters")
    return rows[:limit] if limit else rows


# ----------------------------------------------------------------------------- study texts
# Ten short paragraphs for the stability study (jaxcrit/run/stages/study.py): five English registers and five
# other languages, written for jaxcrit (no outside source), each about 80-130 tokens for SmolLM2.
STUDY_TEXTS = {
    "en_science": (
        "Water expands when it freezes, which is unusual among common liquids. As the temperature falls "
        "toward zero degrees Celsius, hydrogen bonds lock the molecules into an open hexagonal lattice, so "
        "ice takes up about nine percent more space than the liquid it came from. Because the solid is "
        "less dense, it floats, and a frozen lake insulates the water below it. Fish survive the winter "
        "in that darker, slightly warmer layer near the bottom."
    ),
    "en_history": (
        "The canal took eleven years to dig and cost far more than its planners had promised. Thousands of "
        "laborers moved earth with shovels and carts, and outbreaks of fever closed the works more than "
        "once. When the first barge finally passed through in the spring, the town held a parade, and "
        "the price of grain in the eastern markets fell by almost a third within a decade. Railways "
        "later made the canal slow and old-fashioned, but its towpaths are still used by walkers."
    ),
    "en_story": (
        "Mara found the key under the third stair, exactly where her grandmother had said it would be. "
        "It was smaller than she expected and warm from the sun that came through the hall window. She "
        "turned it over twice, then walked to the blue door at the end of the corridor. The lock was "
        "stiff. When it finally gave, the room behind it smelled of cedar and old paper, and every shelf "
        "was filled with jars of buttons sorted by color."
    ),
    "en_instructions": (
        "To replace a bicycle inner tube, first release the brake and remove the wheel from the frame. "
        "Let out any remaining air, then use two tire levers to lift one side of the tire over the rim. "
        "Pull the old tube out and run your fingers carefully around the inside of the tire to find the "
        "thorn or glass that caused the puncture. Insert the new tube with a little air in it, push the "
        "tire back onto the rim, and inflate it to the pressure printed on the sidewall."
    ),
    "en_code": (
        "The function reads a list of records and returns the average price per category. It first "
        "groups the records by their category field, skipping any record whose price is missing or "
        "negative. For each group it adds up the prices and divides by the number of valid records. If "
        "a category has no valid records, it is left out of the result rather than reported as zero. "
        "The tests check an empty list, a single record, and a category with only invalid prices."
    ),
    "fr": (
        "Le petit marché du samedi ouvre très tôt, bien avant que le soleil ne touche les toits. Les "
        "maraîchers installent leurs tables sous les platanes et disposent les tomates, les courgettes et "
        "les bouquets de basilic. Vers neuf heures, la place est pleine de voix, de paniers et de chiens "
        "curieux. Une vieille dame vend du miel de lavande depuis quarante ans et se souvient du prénom "
        "de chacun de ses clients."
    ),
    "de": (
        "Im Herbst sammeln die Eichhörnchen im Stadtpark Nüsse und vergraben sie an vielen verschiedenen "
        "Stellen. Sie merken sich erstaunlich viele dieser Verstecke, aber nicht alle. Aus den vergessenen "
        "Nüssen wachsen im nächsten Frühjahr kleine Bäume, und so tragen die Tiere dazu bei, dass sich der "
        "Wald langsam ausbreitet. Die Gärtner des Parks lassen einige dieser jungen Bäume stehen, wenn sie "
        "an einer geeigneten Stelle wachsen."
    ),
    "es": (
        "El tren de la tarde salió de la estación con veinte minutos de retraso. Por la ventanilla se "
        "veían campos de olivos, pueblos blancos y, de vez en cuando, un río casi seco. Una niña sentada "
        "junto a su abuelo contaba los puentes en voz alta mientras él resolvía un crucigrama con un lápiz "
        "muy corto. Cuando por fin llegaron a la ciudad, ya se habían encendido las farolas y olía a pan "
        "recién hecho."
    ),
    "it": (
        "La biblioteca del paese occupa due stanze sopra l'ufficio postale. Non è grande, ma i volontari "
        "che la gestiscono conoscono ogni libro e sanno consigliare una lettura adatta a chiunque entri. "
        "Il martedì pomeriggio arrivano i bambini della scuola elementare, che si siedono sul tappeto e "
        "ascoltano una storia letta ad alta voce. In inverno la stufa scalda le stanze e qualcuno porta "
        "sempre una torta da dividere."
    ),
    "zh": (
        "清晨的山谷里雾气很重，远处的村庄只露出几个屋顶。老农夫牵着一头水牛慢慢走向田边，"
        "准备在雨季到来之前把最后一块地犁完。"
    ),
}
