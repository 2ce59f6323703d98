// Progressive enhancement: a "Copy" button on every <pre data-copy>. The pages work without it.
document.addEventListener("DOMContentLoaded", () => {
  for (const pre of document.querySelectorAll("pre[data-copy]")) {
    if (!navigator.clipboard) return;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-button";
    button.textContent = "Copy";
    button.addEventListener("click", async () => {
      await navigator.clipboard.writeText(pre.innerText);
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    pre.parentElement.classList.add("has-copy");
    pre.before(button);
  }
});
