// A small Markdown renderer for streamed replies: fenced code (highlighted), inline code, headings,
// lists, quotes, bold/italic, links and paragraphs. Everything is escaped first; only the tags
// made here reach the page. An unclosed fence (mid-stream) renders as code so far.
"use strict";

const Markdown = (() => {
  const escape = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

  const KEYWORDS = new Set((
    "and as assert async await break case catch class const continue def default del do elif else except export " +
    "extends false finally fn for from func function if impl import in is lambda let match mut new nil none not null " +
    "or pass pub raise return self static struct switch this throw true try type typeof use var void while with yield"
  ).split(" "));

  // One pass over the code: comments, strings, numbers and keywords get a class; the rest is plain.
  const TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?\b)|([A-Za-z_]\w*)/g;

  function highlight(code) {
    let out = "", last = 0, m;
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(code))) {
      out += escape(code.slice(last, m.index));
      const [text, comment, string, number, word] = m;
      const cls = comment ? "c" : string ? "s" : number ? "n" : word && KEYWORDS.has(word.toLowerCase()) ? "k" : "";
      out += cls ? `<span class="tok-${cls}">${escape(text)}</span>` : escape(text);
      last = m.index + text.length;
    }
    return out + escape(code.slice(last));
  }

  function inline(text) {
    const codes = [];
    let s = text.replace(/`([^`\n]+)`/g, (_, c) => `\u0000${codes.push(c) - 1}\u0000`);
    s = escape(s)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${escape(codes[+i])}</code>`);
  }

  function render(source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const html = [];
    let para = [], list = null;
    const flushPara = () => { if (para.length) html.push(`<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`); para = []; };
    const flushList = () => { if (list) html.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`); list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara(); flushList();
        const body = [];
        while (++i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i]);
        const lang = fence[1] ? ` data-lang="${escape(fence[1])}"` : "";
        html.push(`<pre${lang}><code>${highlight(body.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushPara(); flushList();
        const level = Math.min(heading[1].length + 2, 6); // the page's own h1/h2 stay above replies
        html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (/^>\s?/.test(line)) {
        flushPara(); flushList();
        html.push(`<blockquote>${inline(line.replace(/^>\s?/, ""))}</blockquote>`);
      } else if (!line.trim()) {
        flushPara(); flushList();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return html.join("");
  }

  return { render, highlight, escape };
})();
