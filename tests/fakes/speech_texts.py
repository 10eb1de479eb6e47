"""Texts the speech tests speak with Piper and hear back with Whisper."""

from __future__ import annotations

__all__ = ["LONG_SPEECH", "TWO_WINDOWS"]

# About 63 seconds spoken by the embedded voice: three of Whisper's 30-second windows.
LONG_SPEECH = (
    "Seven silver swans swam silently across the misty lake at dawn. A farmer in a red coat counted"
    " his sheep twice before breakfast. The old clock in the hallway chimed eleven times although it"
    " was noon. Children ran along the beach collecting shells of every colour. My neighbour bakes"
    " bread on Sundays and shares it with the whole street. The train to the coast was late because"
    " of snow on the line. She painted the kitchen door green and the windows a pale shade of blue."
    " Two owls argued loudly in the oak tree behind the library. The museum opens at nine and closes"
    " early on public holidays. We planted tomatoes, beans and a row of sunflowers by the fence. A"
    " small boat carried letters and medicine to the island every Tuesday. The mechanic found a"
    " loose wire under the seat of the bus. Thunder rolled over the hills while the dogs hid under"
    " the table. He learned to play the violin from a teacher who lived next door. The bakery on the"
    " corner sells warm pretzels until the afternoon. Rain fell all night and the river rose above"
    " the old stone bridge. Our team won the match after a long and difficult second half. The"
    " astronaut described the view of the earth as calm and bright."
)
# About 40 seconds: two of Whisper's 30-second windows.
TWO_WINDOWS = LONG_SPEECH.split(" A small boat", maxsplit=1)[0]
