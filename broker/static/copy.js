// Copy buttons: a button with data-copy="<id>" copies that element's text.
// Pages work without this script; the buttons stay hidden then.
"use strict";
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  if (!navigator.clipboard) { return; }
  button.hidden = false;
  button.addEventListener("click", function () {
    var source = document.getElementById(button.dataset.copy);
    if (!source) { return; }
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      button.textContent = "Copied";
    }, function () {
      button.textContent = "Select and copy by hand";
    });
  });
});
