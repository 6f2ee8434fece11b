"""How often core's MATH checker accepts the forms a model would box for MATH-500's golds.

FORMS maps a MATH-500 question (its index in test.jsonl) to equivalent answers in the ways a Qwen-style model
writes them, the most common first. A question not listed whose gold is an integer gets the integer and, from
1,000 up, '1,000' and '1{,}000'; the 6 others are not counted. Each form is boxed in three closings ("**Final Answer**" with $\\boxed{}$,
"the final answer is: $\\boxed{}$", a display \\[ \\boxed{} \\]) and must be judged right in all three. Printed:
how many golds reject their most common form, how many reject any form, and every rejected form.

Run: python bench/math_forms.py [--data-dir ../shared/data]
"""

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402
from bench.header import print_header, print_wall_time  # noqa: E402

CLOSINGS = ["... so the answer follows.\n\n**Final Answer**\n$\\boxed{{{}}}$",
            "Therefore, the final answer is: $\\boxed{{{}}}$. I hope it is correct.", "Thus\n\\[\n\\boxed{{{}}}\n\\]"]


def forms_of(index, gold):
    if index in FORMS:
        return FORMS[index]
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        return [gold] + ([f"{n:,}", f"{n:,}".replace(",", "{,}")] if abs(n) >= 1000 else [])
    return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="folder with math500/test.jsonl (default: download)")
    args = parser.parse_args()
    started = time.time()
    print_header("How often core's MATH checker accepts the forms a model would box for MATH-500's golds (text "
                 "processing only: no model runs)")
    print("# each form is boxed in three closings and must be judged right in all three; every rejected form is "
          "listed\n")
    problems = core.load_problems("math500", "test", args.data_dir)
    golds = primary = some = forms = wrong = 0
    for index, problem in enumerate(problems):
        rejected = [(j, form) for j, form in enumerate(forms_of(index, problem.gold))
                    if not all(core.is_correct(c.format(form), problem.gold, "math") for c in CLOSINGS)]
        listed = forms_of(index, problem.gold)
        golds, forms, wrong = golds + bool(listed), forms + len(listed), wrong + len(rejected)
        primary, some = primary + any(j == 0 for j, _ in rejected), some + bool(rejected)
        for j, form in rejected:
            print(f"{'most common' if j == 0 else '':<12} {index:>3} gold {problem.gold!r}: {form!r} judged wrong")
    print(f"{golds} golds, {forms} forms: {wrong} forms judged wrong; {primary} golds reject their most common "
          f"form, {some} reject some form")
    print_wall_time(started)


FORMS = {  # question index -> equivalent boxed forms, the most common first
0: [r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", r"(3, \pi/2)"],
1: [r"p - q", r"p-q"],
2: [r"\frac{14}{3}", r"\dfrac{14}{3}", r"4\frac{2}{3}"],
4: [r"\text{Evelyn}", r"Evelyn", r"\textbf{Evelyn}"],
7: [r"90^\circ", r"90", r"90^{\circ}"],
8: [r"3\sqrt{13}", r"3 \sqrt{13}", r"\sqrt{117}"],
11: [r"\frac{3}{56}", r"\dfrac{3}{56}"],
14: [r"\sqrt{51}"],
15: [r"6 - 5i", r"6-5i"],
17: [r"\pi"],
20: [r"6 + 9i", r"6+9i"],
23: [r"5", r"x = 5"],
25: [r"1, -2", r"-2, 1", r"-2,1"],
28: [r"-2 + 7i", r"-2+7i"],
30: [r"52_8", r"52_{8}", r"52"],
31: [r"11\sqrt{2}", r"11\sqrt2"],
33: [r"\frac{243}{625}", r"\dfrac{243}{625}", r"0.3888"],
36: [r"3, 5, 7", r"3,5,7", r"x = 3, 5, 7"],
43: [r"70\sqrt{2}", r"70 \sqrt{2}"],
44: [r"1.25", r"\frac{5}{4}"],
48: [r"\frac{3}{2}", r"1.5", r"\dfrac{3}{2}"],
51: [r"x^5 - x^4 + x^3 - x^2 + x - 1"],
53: [r"-\frac{\pi}{6}", r"-\dfrac{\pi}{6}", r"\frac{-\pi}{6}"],
54: [r"0.15", r"\frac{3}{20}"],
60: [r"(6, 31, -1)", r"(6,31,-1)"],
64: [r"\frac{35}{64}", r"\dfrac{35}{64}"],
66: [r"x^3 + 3x - 6", r"x^3+3x-6"],
70: [r"40_9", r"40_{9}"],
71: [r"2516_8", r"2516_{8}"],
73: [r"\frac{3\sqrt{3}}{4}", r"\dfrac{3\sqrt{3}}{4}", r"\frac{3}{4}\sqrt{3}"],
74: [r"\cot x", r"\cot(x)"],
78: [r"(-2, 1)", r"\left(-2, 1\right)"],
85: [r"\sqrt{5}"],
92: [r"\frac{448}{15625}", r"\dfrac{448}{15625}"],
96: [r"1 \pm \sqrt{19}", r"1 + \sqrt{19}, 1 - \sqrt{19}"],
97: [r"\text{east}", r"\text{East}", r"East"],
98: [r"2k + 2", r"2k+2", r"2(k+1)"],
99: [r"\begin{pmatrix} -\frac{1}{3} \\ \frac{2}{3} \\ \frac{5}{3} \end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", r"\begin{pmatrix} -\dfrac{1}{3} \\ \dfrac{2}{3} \\ \dfrac{5}{3} \end{pmatrix}"],
100: [r"145^\circ", r"145"],
102: [r"(a+5)(b+2)", r"(a + 5)(b + 2)"],
103: [r"(3, 4]", r"(3,4]"],
106: [r"\frac{4}{3}", r"\dfrac{4}{3}"],
109: [r"120^\circ", r"120"],
120: [r"\text{even}", r"\text{Even}", r"even"],
124: [r"\frac{11}{2}", r"5.5"],
126: [r"1 + 274i", r"1+274i"],
127: [r"4210_5", r"4210_{5}"],
129: [r"\frac{3840}{289}", r"\dfrac{3840}{289}"],
137: [r"204_5", r"204_{5}"],
138: [r"\frac{1}{3}", r"\dfrac{1}{3}"],
143: [r"3\sqrt{5}", r"3 \sqrt{5}"],
144: [r"(15, -29)", r"\left(15, -29\right)"],
146: [r"\frac{\sqrt{3}}{3}", r"\dfrac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"],
153: [r"\frac{2}{21}", r"\dfrac{2}{21}"],
154: [r"2\sqrt{113}"],
155: [r"\frac{1}{4}", r"\dfrac{1}{4}"],
156: [r"30^\circ", r"30"],
157: [r"\frac{6}{5}", r"\dfrac{6}{5}"],
159: [r"3.21"],
162: [r"\frac{17}{50}", r"\dfrac{17}{50}", r"0.34"],
163: [r"-\frac{35}{9}", r"-\dfrac{35}{9}"],
164: [r"-\sqrt{3}"],
165: [r"\frac{4}{9}", r"\dfrac{4}{9}"],
166: [r"\frac{270}{7}", r"\frac{270}{7}^\circ", r"\dfrac{270}{7} \text{ degrees}"],
171: [r"\frac{13}{15}", r"\dfrac{13}{15}"],
176: [r"0.0000672", r"6.72 \times 10^{-5}"],
177: [r"30^\circ", r"30"],
179: [r"5x - 7y + 11z + 4 = 0"],
181: [r"\frac{\sqrt{3}}{3}", r"\dfrac{\sqrt{3}}{3}"],
184: [r"(2, \infty)", r"(2,\infty)"],
190: [r"\frac{13}{18}", r"\dfrac{13}{18}"],
194: [r"\frac{1}{4}", r"\dfrac{1}{4}"],
198: [r"10080", r"10,080", r"10{,}080"],
202: [r"\frac{2}{3}", r"\dfrac{2}{3}"],
205: [r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}"],
206: [r"\left( \frac{3}{2}, -13 \right)", r"\left(\dfrac{3}{2}, -13\right)", r"(1.5, -13)"],
217: [r"11111111100", r"11,111,111,100"],
219: [r"\frac{1}{2}", r"\dfrac{1}{2}"],
220: [r"\frac{16}{27}", r"\dfrac{16}{27}"],
224: [r"\frac{9}{256}", r"\dfrac{9}{256}"],
227: [r"\text{(C)}", r"C", r"\text{C}"],
228: [r"288\pi", r"288 \pi"],
230: [r"\frac{16}{5}", r"\dfrac{16}{5}"],
232: [r"\frac{1997}{2}", r"\dfrac{1997}{2}"],
233: [r"30^\circ", r"30"],
235: [r"\frac{5}{9}", r"\dfrac{5}{9}"],
242: [r"32348", r"\$32,348", r"32,\!348"],
245: [r"-13x + 3", r"-13x+3"],
247: [r"\frac{10}{11}", r"\dfrac{10}{11}"],
248: [r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}"],
253: [r"\frac{1}{8}", r"\dfrac{1}{8}"],
255: [r"\text{(E)}", r"E", r"\text{E}"],
256: [r"\frac{8}{21}", r"\dfrac{8}{21}"],
257: [r"864", r"864 \text{ square inches}", r"864 \text{ in}^2"],
260: [r"120^\circ", r"120"],
261: [r"76^\circ", r"76"],
264: [r"1\frac{4}{5}", r"1 \frac{4}{5}", r"\frac{9}{5}"],
266: [r"\frac{33}{100}", r"\dfrac{33}{100}", r"0.33"],
267: [r"180^\circ", r"180"],
274: [r"18 + 2\pi", r"18+2\pi", r"2\pi + 18"],
277: [r"\sqrt{53}"],
279: [r"7\pi"],
281: [r"36^\circ", r"36"],
284: [r"3 \pm 2\sqrt{2}", r"3 \pm 2 \sqrt{2}"],
286: [r"\frac{17}{21}", r"\dfrac{17}{21}"],
293: [r"\left( \frac{3}{5}, \frac{8}{3} \right]", r"\left(\dfrac{3}{5}, \dfrac{8}{3}\right]"],
296: [r"\text{(B)}", r"B", r"\textbf{(B)}"],
298: [r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}"],
301: [r"5.4", r"5.4 \text{ cents}"],
305: [r"\frac{9}{19}", r"\dfrac{9}{19}"],
307: [r"(-\infty, 0]", r"(-\infty,0]"],
308: [r"1 + 2\sqrt{3}", r"1+2\sqrt{3}"],
312: [r"(5, \infty)"],
313: [r"12\pi"],
314: [r"(2, 4)"],
318: [r"\frac{11 + 9a}{20}", r"\frac{9a + 11}{20}"],
320: [r"-\frac{24}{25}", r"-\dfrac{24}{25}"],
323: [r"\frac{1}{3}", r"\dfrac{1}{3}"],
326: [r"\frac{9}{100}", r"\dfrac{9}{100}"],
331: [r"\frac{13}{6}", r"\dfrac{13}{6}"],
338: [r"4343_6", r"4343_{6}"],
339: [r"2k"],
340: [r"55^\circ", r"55"],
343: [r"58,500", r"58500", r"58{,}500"],
347: [r"6r^2 - 4r - 24", r"6r^2-4r-24"],
351: [r"\frac{1}{16}", r"\dfrac{1}{16}"],
352: [r"11\sqrt{5} + 11", r"11 + 11\sqrt{5}"],
356: [r"(-\sqrt{3}, \sqrt{3})"],
358: [r"\text{ellipse}", r"\text{Ellipse}"],
360: [r"\frac{7}{4}", r"\dfrac{7}{4}"],
361: [r"16\sqrt{3}"],
362: [r"\frac{1}{4}", r"\dfrac{1}{4}"],
364: [r"(1, -16, -4, 43)"],
372: [r"90^\circ", r"90"],
373: [r"1 + 2i", r"1+2i"],
376: [r"(8, -2)"],
380: [r"(0, 9) \cup (9, 36)", r"(0,9) \cup (9,36)"],
381: [r"\frac{1}{2}", r"\dfrac{1}{2}"],
382: [r"\frac{20000}{\pi}", r"\dfrac{20000}{\pi}"],
383: [r"[-2, 7]", r"[-2,7]", r"x \in [-2, 7]"],
384: [r"15x - 80"],
388: [r"\frac{11}{2}", r"\dfrac{11}{2}"],
389: [r"\frac{\sqrt{21}}{5}", r"\dfrac{\sqrt{21}}{5}"],
392: [r"\sqrt{66}"],
393: [r"\frac{3}{4}", r"\dfrac{3}{4}"],
394: [r"-\frac{3}{8}", r"-\dfrac{3}{8}"],
398: [r"\text{Navin}", r"Navin"],
399: [r"326.5"],
400: [r"\frac{14}{3}", r"\dfrac{14}{3}"],
401: [r"\frac{13}{4}", r"\dfrac{13}{4}"],
402: [r"1 - 12i", r"1-12i"],
408: [r"\begin{pmatrix} \frac{1}{5} \\ -\frac{18}{5} \end{pmatrix}", r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"],
409: [r"2\sqrt{5}", r"2 \sqrt{5}"],
413: [r"5r^5"],
416: [r"\frac{1}{8}", r"\dfrac{1}{8}"],
418: [r"2\sqrt{5}"],
419: [r"\begin{pmatrix} -7 \\ 16 \\ 5 \end{pmatrix}"],
420: [r"\begin{pmatrix} \frac{16}{49} \\ \frac{48}{49} \\ \frac{24}{49} \end{pmatrix}", r"\begin{pmatrix} 16/49 \\ 48/49 \\ 24/49 \end{pmatrix}"],
422: [r"1 \pm \sqrt{5}, -2", r"-2, 1 + \sqrt{5}, 1 - \sqrt{5}", r"\{1 \pm \sqrt{5}, -2\}"],
425: [r"3R^2"],
426: [r"6\sqrt{2}"],
430: [r"4.5", r"\frac{9}{2}"],
431: [r"\left[ \frac{\pi^2}{8}, \frac{5\pi^2}{4} \right]", r"\left[\dfrac{\pi^2}{8}, \dfrac{5\pi^2}{4}\right]"],
433: [r"0.35625", r"\frac{57}{160}"],
435: [r"(-\infty, 2) \cup (3, \infty)"],
439: [r"x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1"],
444: [r"\frac{1}{2}", r"\dfrac{1}{2}"],
451: [r"\frac{639}{40}", r"\dfrac{639}{40}", r"15.975"],
454: [r"y = 2x + 3"],
456: [r"-2, 1", r"1, -2"],
459: [r"\$18.90", r"18.90", r"18.9"],
466: [r"8\pi"],
467: [r"15", r"15 \text{ cm}^2", r"15 \, \text{cm}^2"],
472: [r"137\frac{1}{2}", r"137 \frac{1}{2}", r"137 \tfrac{1}{2}"],
478: [r"\frac{2}{1005}", r"\dfrac{2}{1005}"],
481: [r"8n^2 + 4n + 1"],
483: [r"\frac{8}{15}", r"\dfrac{8}{15}"],
488: [r"36", r"\$36", r"\$36.00"],
492: [r"y = -2x", r"-2x"],
494: [r"\frac{1}{4}", r"\dfrac{1}{4}"],
496: [r"\frac{5}{13}", r"\dfrac{5}{13}"],
497: [r"\frac{7}{2}", r"\dfrac{7}{2}"],
499: [r"106^\circ", r"106"],
}


if __name__ == "__main__":
    main()
